"""The admin listener: liveness, readiness and Prometheus metrics (PRODUCT.md §6).

Readiness asks Redis and the SQL store with short timeouts. Redis down under `fail_open` is
`degraded` (200): pulling every instance out of service would defeat failing open.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import metrics

Check = Callable[[], Awaitable[None]]
CHECK_TIMEOUT = 2.0


def admin_app(*, redis_check: Check, database_check: Check, fail_closed: bool,
              before_metrics: Check | None = None) -> web.Application:
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        redis_ok, database_ok = await asyncio.gather(_passes(redis_check), _passes(database_check))
        checks = {"redis": "ok" if redis_ok else "down", "database": "ok" if database_ok else "down"}
        if redis_ok and database_ok:
            status, code = "ready", 200
        elif not redis_ok and fail_closed:
            status, code = "unavailable", 503
        else:
            # Requests are still served: fail_open spools usage, tenants come from the cache.
            status, code = "degraded", 200
        return web.json_response({"status": status, "checks": checks}, status=code,
                                 dumps=lambda o: json.dumps(o, separators=(",", ":")))

    async def metrics_endpoint(_: web.Request) -> web.Response:
        if before_metrics is not None:
            await before_metrics()
        return metrics_response()

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


def metrics_response() -> web.Response:
    """The Prometheus exposition of this process (all workers' sum in multiprocess mode)."""
    body, content_type = metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type  # carries its own charset/version parameters
    return response


async def _passes(check: Check) -> bool:
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except Exception:  # any failure of a dependency means "not ready", never a 500
        return False
    return True
