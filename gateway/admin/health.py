"""The admin listener: liveness, readiness and Prometheus metrics (PRODUCT.md §6).

Readiness asks Redis and the SQL store with short timeouts. Redis down under `fail_open` is
`degraded` (200): pulling every instance out of service would defeat failing open.
Every error is problem+json with the request id; a fault of ours is a 500 with its traceback in the log
only. No client input reaches such a fault: the endpoints here read none.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import metrics
from gateway.config.settings import ServerSettings
from gateway.errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    problem_response,
)
from gateway.proxy.headers import request_id

log = logging.getLogger("cosmos_gateway.admin")
Check = Callable[[], Awaitable[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHECK_TIMEOUT = 2.0


def admin_app(*, redis_check: Check, database_check: Check, fail_closed: bool,
              before_metrics: Check | None = None,
              problem_type_base: str = ServerSettings.problem_type_base) -> web.Application:
    app = web.Application(middlewares=[_problems(problem_type_base)])

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


def _problems(type_base: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Every error of the admin listener as problem+json: the router's 404/405, and faults of ours as a
    500 with the traceback in the log only. (The /admin API has its own middleware inside this one.)"""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id(request.raw_headers)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            error = _http_error(exc)
            if error is None:
                raise  # redirects and the like, raised on purpose by a handler
            response = problem_response(error, type_base, rid)
        except Exception:
            log.exception("admin listener: unexpected error on %s %s (request %s)", request.method,
                          request.rel_url.raw_path[:200], rid)
            response = problem_response(GatewayError("the request could not be completed"), type_base, rid)
        return response

    return middleware


def _http_error(exc: web.HTTPException) -> GatewayError | None:
    """aiohttp's own errors (router, body size, 5xx) as the gateway's error of that kind; None for the rest."""
    if exc.status == 404:
        return NotFound("no such resource on the admin listener")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return MethodNotAllowed("the method is not allowed here", headers={"Allow": allowed} if allowed else None)
    if exc.status == 413:
        return PayloadTooLarge("the request body is too large")
    if exc.status >= 500:
        return GatewayError("the request could not be completed")
    return None


async def _passes(check: Check) -> bool:
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except Exception:  # any failure of a dependency means "not ready", never a 500
        return False
    return True
