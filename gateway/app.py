"""Wires one worker together: the parts a worker owns, its two listeners, start and drain.

`Worker` is what `serve` runs in each process and what tests start in-process on free ports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from aiohttp import web

from gateway.accesslog import AccessLog
from gateway.admin import admin_app
from gateway.auth import Authenticator
from gateway.config import Settings
from gateway.listener import LimitedSockSite, ProblemServer, bind
from gateway.metrics import RequestMetrics
from gateway.proxy import ProxyHandler
from gateway.upstream import UpstreamPool
from gateway.websocket import WebSocketRelay
from metering import db

class Worker:
    """One gateway process: proxy listener, admin listener and the clients they share."""

    def __init__(self, settings: Settings, *, reuse_port: bool = False) -> None:
        if settings.upstream.url is None:
            raise ValueError("upstream.url must be resolved before starting a worker")
        self.settings = settings
        self._reuse_port = reuse_port
        self.authenticator = Authenticator(settings.auth)
        self.pool = UpstreamPool(
            settings.upstream.url, connect_timeout=settings.upstream.connect_timeout,
            read_timeout=settings.upstream.read_timeout, max_connections=settings.upstream.max_connections,
        )
        self.websockets = WebSocketRelay(settings.upstream.url,
                                         connect_timeout=settings.upstream.connect_timeout)
        self.redis = aioredis.Redis.from_url(
            settings.redis.url or "redis://127.0.0.1:6379/0", socket_timeout=0.5, socket_connect_timeout=0.5,
        )
        self.engine = db.create_engine(settings.database.url)
        self.access_log = AccessLog(enabled=settings.server.access_log)
        plans = set(settings.plans) | {"starter", "professional", "enterprise", "sovereign"}
        self.metrics = RequestMetrics(plans)
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.proxy_port = 0
        self.admin_port = 0

    async def start(self) -> None:
        settings = self.settings
        await self.authenticator.start()
        handler = ProxyHandler(settings, self.authenticator, self.pool, self.websockets, self.metrics,
                               self.access_log)
        http_limits = {
            "keepalive_timeout": settings.listen.header_timeout,
            "max_line_size": settings.listen.max_header_size,
            "max_field_size": settings.listen.max_header_size,
        }
        grace = settings.server.shutdown_grace_seconds
        self._proxy_runner = web.ServerRunner(
            ProblemServer(handler, type_base=settings.server.problem_type_base, access_log=None,
                          handler_cancellation=True, **http_limits),
            shutdown_timeout=grace, handle_signals=False,
        )
        await self._proxy_runner.setup()
        proxy_sock = bind(settings.listen.proxy, reuse_port=self._reuse_port)
        await LimitedSockSite(self._proxy_runner, proxy_sock,
                              max_connections=settings.listen.max_connections).start()
        self.proxy_port = proxy_sock.getsockname()[1]

        admin = admin_app(
            redis_check=self._ping_redis, database_check=lambda: db.ping(self.engine),
            fail_closed=settings.redis.on_error == "fail_closed",
        )
        self._admin_runner = web.AppRunner(admin, access_log=None, shutdown_timeout=grace,
                                           handle_signals=False)
        await self._admin_runner.setup()
        admin_sock = bind(settings.listen.admin, reuse_port=self._reuse_port)
        await web.SockSite(self._admin_runner, admin_sock).start()
        self.admin_port = admin_sock.getsockname()[1]

    async def _ping_redis(self) -> None:
        await self.redis.ping()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace, then close clients."""
        runners = [r for r in (self._proxy_runner, self._admin_runner) if r is not None]
        await asyncio.gather(*(r.cleanup() for r in runners), return_exceptions=True)
        await self.websockets.close()
        await self.pool.close()
        await self.authenticator.close()
        await self.redis.aclose()
        await self.engine.dispose()
        self.access_log.flush()


async def run_until_stopped(worker: Worker, stop: asyncio.Event,
                            on_started: Callable[[Worker], None] | None = None) -> None:
    await worker.start()
    if on_started is not None:
        on_started(worker)
    try:
        await stop.wait()
    finally:
        await worker.stop()
