"""Development conveniences for `serve` and `demo`: a private redis-server and a demo upstream.

Used only when the configuration leaves `redis.url` or `upstream.url` unset (null); production
configs name both. The command line (`gateway.cli.main`) starts them before it calls the server, so
`gateway.server` and `gateway.app` never depend on this module. The test suite uses `RedisProcess` too,
so it can stop and restart Redis.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace

from gateway.config.settings import Settings

log = logging.getLogger("cosmos_gateway.devservices")


class DevServiceError(RuntimeError):
    """A development service could not be started; the message says what to do."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise DevServiceError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise DevServiceError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class RedisProcess:
    """A private redis-server on a loopback port that keeps nothing on disk; stoppable, restartable."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise DevServiceError(
                "redis-server is not installed: install it (Debian: apt-get install redis-server) "
                "or set REDIS_URL to a running Redis"
            )
        self.binary = binary
        self.port = port or free_port()
        self.extra_args = extra_args
        self.dir = tempfile.mkdtemp(prefix="cosmos-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisProcess:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class DemoUpstream:
    """The built-in demo upstream (`gateway.cli.demo_upstream`) in a child process."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DemoUpstream:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.demo_upstream", "--port", str(self.port)],
        )
        wait_for_port(self.port, process=self.process)
        return self

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)


@contextlib.contextmanager
def resolved(settings: Settings) -> Iterator[Settings]:
    """The settings with a private Redis and demo upstream filled in where none is configured."""
    with contextlib.ExitStack() as stack:
        if settings.redis.url is None:
            redis = RedisProcess().start()
            stack.callback(redis.close)
            log.warning("redis.url is not set: started a private redis-server on %s (development only; "
                        "set REDIS_URL in production)", redis.url)
            settings = replace(settings, redis=replace(settings.redis, url=redis.url))
        if settings.upstream.url is None:
            upstream = DemoUpstream().start()
            stack.callback(upstream.close)
            log.warning("upstream.url is null: serving the built-in demo upstream on %s", upstream.url)
            settings = replace(settings, upstream=replace(settings.upstream, url=upstream.url))
        yield settings
