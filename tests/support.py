"""Real parts for the tests: an upstream HTTP server, gateways in-process or as processes, tokens."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jwt
import yaml
from aiohttp import web

from gateway.auth.tokens import Authenticator
from gateway.cli.devservices import free_port, wait_for_port
from gateway.config import SECRET_ENV, Settings, parse_settings
from gateway.config.settings import AuthSettings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-only-hs256-secret-0123456789abcdef0123"
ISSUER = "https://auth.test/"
AUDIENCE = "cosmosbuilder-api"
# EVAL it with a number of microseconds to keep the single-threaded Redis busy that long: a stall for
# timeout tests (DEBUG SLEEP is disabled by default).
BUSY_SCRIPT = """
local function micros() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end
local start = micros()
while micros() - start < tonumber(ARGV[1]) do end
"""


def token(tenant: str | None = "acme", *, ttl: int = 600, secret: str = SECRET, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + ttl}
    if tenant is not None:
        payload["org_id"] = tenant
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(tenant: str | None = "acme", **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(tenant, **claims)}"}


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str, within: float = 15.0) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def is_(value: Awaitable[Any], expected: Any) -> bool:
    """`await value == expected`, for `eventually(lambda: is_(read(), 3), ...)`."""
    return await value == expected


def config_dict(upstream_url: str, redis_url: str, database_url: str, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "listen": {"proxy": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "upstream": {"url": upstream_url, "connect_timeout": 2, "read_timeout": 3},
        # The spool sits beside the test's SQLite file (a tmp_path), never in the checkout.
        "redis": {"url": redis_url, "spool_dir": _spool_dir(database_url)},
        "database": {"url": database_url},
        "auth": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["HS256"], "hs256_secret": SECRET,
                 "public_paths": ["/health", "/status/**"]},
        "server": {"shutdown_grace_seconds": 5, "access_log": False},
    }
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def _spool_dir(database_url: str) -> str:
    if database_url.startswith("sqlite"):
        return str(Path(database_url.split(":///", 1)[1]).parent / "spool")
    return str(Path(os.environ.get("TMPDIR", "/tmp")) / f"cosmos-spool-{os.getpid()}")


def settings_for(upstream_url: str, redis_url: str, database_url: str, **overrides: Any) -> Settings:
    return parse_settings(config_dict(upstream_url, redis_url, database_url, **overrides))


def auth_settings(**overrides: Any) -> AuthSettings:
    """The `auth` section of the test config (HS256 with SECRET), for an Authenticator on its own."""
    base: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ("HS256",),
                            "hs256_secret": SECRET, "leeway_seconds": 30.0}
    base.update(overrides)
    return AuthSettings(**base)


@contextlib.asynccontextmanager
async def jwks_authenticator(jwks_url: str, **overrides: Any) -> AsyncIterator[Authenticator]:
    """An Authenticator of RS256 tokens whose keys come from `jwks_url` only, started; closed on the way out."""
    auth = Authenticator(auth_settings(algorithms=("RS256",), hs256_secret=None, jwks_url=jwks_url, **overrides))
    await auth.start()
    try:
        yield auth
    finally:
        await auth.close()


# --------------------------------------------------------------------------- upstream


def upstream_app(record: list[web.BaseRequest] | None = None) -> web.Application:
    """The upstream the proxy tests talk to: each route shows one behaviour."""

    async def echo(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
        if record is not None:
            record.append(request)
        headers = {"X-Cosmos-Usage": request.query["usage"]} if "usage" in request.query else None
        return web.json_response(status=int(request.query.get("status", "200")), headers=headers, data={
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_size": size,
            "body_sha256": digest.hexdigest(),
            "chunked": request.headers.get("Transfer-Encoding") == "chunked",
        })

    async def cookies(_: web.Request) -> web.Response:
        response = web.Response(text="cookies")
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response

    async def hop(_: web.Request) -> web.Response:
        return web.Response(text="hop", headers={
            "Connection": "X-Upstream-Secret", "X-Upstream-Secret": "leak", "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic", "X-Kept": "yes", "X-Cosmos-Usage": "chains=3, storage_gb=12.5",
        })

    async def stream(request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = b"x" * 65536
        while size > 0:
            await response.write(block[: min(size, len(block))])
            size -= len(block)
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "10")))
        return web.Response(text="slow")

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000000"})
        await response.prepare(request)
        await response.write(b"y" * 1000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for message in ws:
            if message.type == web.WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type == web.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status")

    app = web.Application(client_max_size=2**40)
    app.router.add_route("*", "/cookies", cookies)
    app.router.add_route("*", "/hop", hop)
    app.router.add_get("/stream/{size}", stream)
    app.router.add_get("/api/stream/{size}", stream)  # the same under /api/: metered by the default meters
    app.router.add_get("/slow", slow)
    app.router.add_get("/cut", cut)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/code/{code}", status)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


class Upstream:
    """An upstream app served on a free loopback port."""

    def __init__(self, app: web.Application, **runner_args: Any) -> None:
        self.app = app
        self.runner = web.AppRunner(app, access_log=None, **runner_args)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Upstream:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def close(self) -> None:
        await self.runner.cleanup()


# --------------------------------------------------------------------------- gateway as a process


class Listeners:
    """The URLs of a gateway's two listeners on 127.0.0.1, from its `proxy_port` and `admin_port`."""

    proxy_port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


class GatewayProcess(Listeners):
    """`cosmos-gateway serve` in a child process with a config file, on free ports."""

    def __init__(self, config: dict[str, Any], workdir: Path, *, workers: int | str = 1,
                 env: Mapping[str, str] | None = None) -> None:
        self.proxy_port = free_port()
        self.admin_port = free_port()
        config = {**config, "listen": {**config.get("listen", {}),
                                       "proxy": f"127.0.0.1:{self.proxy_port}",
                                       "admin": f"127.0.0.1:{self.admin_port}"}}
        self.config_path = workdir / f"gateway-{self.proxy_port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.workers = workers
        # The config file is the whole truth for a test gateway: no secrets from the outer environment.
        inherited = {k: v for k, v in os.environ.items() if k not in SECRET_ENV and not k.startswith("GATEWAY")}
        self.env = {**inherited, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"gateway-{self.proxy_port}.log"

    def start(self) -> GatewayProcess:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path),
             "--workers", str(self.workers)],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
            start_new_session=True,  # its own process group: stop() takes the workers down with it
        )
        wait_for_port(self.proxy_port, timeout=20, process=self.process)
        wait_for_port(self.admin_port, timeout=20, process=self.process)
        return self

    def rss_bytes(self) -> int:
        """Resident memory of the gateway and its workers."""
        assert self.process is not None
        pids = [self.process.pid, *child_pids(self.process.pid)]
        total = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/statm").read_text().split()
            except OSError:
                continue
            total += int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
        return total

    def terminate(self, timeout: float = 20) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_gateway(upstream_url: str, redis_url: str, workdir: Path, /, *, sqlite_file: str = "gateway.db",
                    env: Mapping[str, str] | None = None, **overrides: Any) -> Iterator[GatewayProcess]:
    """A GatewayProcess of `config_dict` with its SQLite file at `workdir / sqlite_file`, started; stopped on
    the way out (a start that failed too: its child may still run)."""
    config = config_dict(upstream_url, redis_url, f"sqlite+aiosqlite:///{workdir / sqlite_file}", **overrides)
    process = GatewayProcess(config, workdir, env=env)
    try:
        yield process.start()
    finally:
        process.stop()


def child_pids(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
