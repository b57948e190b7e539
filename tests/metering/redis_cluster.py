"""A real three-master Redis Cluster on loopback ports, for tests (no replicas, nothing on disk)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time

from gateway.cli.devservices import DevServiceError, wait_for_port

BUS_OFFSET = 10000  # a cluster node also listens on its port + 10000 (the cluster bus)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose bus port (+10000) is free and below 65536, which an ephemeral port may not be."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise DevServiceError("no free port pair for a cluster node")


class RedisClusterProcess:
    """Three `redis-server --cluster-enabled yes` joined by `redis-cli --cluster create`."""

    def __init__(self, masters: int = 3) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise DevServiceError("redis-server and redis-cli are needed for a test cluster")
        self.server, self.cli = server, cli
        self.ports = [cluster_port() for _ in range(masters)]
        self.dir = tempfile.mkdtemp(prefix="cosmos-redis-cluster-")
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> RedisClusterProcess:
        try:
            for port in self.ports:
                process = subprocess.Popen(
                    [self.server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", f"{self.dir}/nodes-{port}.conf", "--save", "",
                     "--appendonly", "no", "--dir", self.dir],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                self.processes.append(process)
                wait_for_port(port, process=process)
            nodes = [f"127.0.0.1:{port}" for port in self.ports]
            subprocess.run(
                [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=30,
            )
            self._wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ok(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [
                subprocess.run(
                    [self.cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=5
                ).stdout
                for port in self.ports
            ]
            if all("cluster_state:ok" in state for state in states):
                return
            time.sleep(0.1)
        raise DevServiceError(f"cluster on ports {self.ports} not ok after {timeout} s")

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
