"""The chaos upstream: fixed-size bodies (so bytes are known exactly) and a record of what it served.

Every answer carries `X-Chaos-Upstream`, so a client tells the upstream's answers from the gateway's own
(401/429/503/502/504 problem responses). A request is recorded as served only once its whole body was read
and the answer is about to be written: an abandoned upload never gets that far.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiohttp import web

MARK = "X-Chaos-Upstream"
DEPLOY_BODY = b'{"deployment":"queued"}'.ljust(300, b" ")
CODE_BODY = b"code".ljust(64, b".")


@dataclass
class Served:
    rid: str
    tenant: str
    route: str  # "deploy" | "data" | "code" | "slow5xx"
    status: int
    size: int  # response body bytes
    usage: str | None  # the X-Cosmos-Usage report, if any
    at: float


class ChaosUpstream:
    def __init__(self) -> None:
        self.served: dict[str, Served] = {}

    def _answer(self, request: web.Request, route: str, status: int, body: bytes) -> web.Response:
        usage = request.query.get("usage")
        rid = request.headers.get("X-Request-Id", "")
        self.served[rid] = Served(rid, request.headers.get("X-Cosmos-Tenant", ""), route, status, len(body),
                                  usage, time.time())
        headers = {MARK: "1", **({"X-Cosmos-Usage": usage} if usage else {})}
        return web.Response(status=status, body=body, headers=headers, content_type="application/octet-stream")

    async def deploy(self, request: web.Request) -> web.Response:
        await request.read()
        if "slow" in request.query:  # a slow 5xx: its refund lands after its billing bucket closed
            await asyncio.sleep(float(request.query["slow"]))
        return self._answer(request, "deploy", int(request.query.get("status", "201")), DEPLOY_BODY)

    async def data(self, request: web.Request) -> web.Response:
        return self._answer(request, "data", 200, b"d" * int(request.match_info["size"]))

    async def code(self, request: web.Request) -> web.Response:
        return self._answer(request, "code", int(request.match_info["code"]), CODE_BODY)

    async def slow5xx(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "3")))
        return self._answer(request, "slow5xx", 500, CODE_BODY)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2**20)
        app.router.add_post("/api/chains/{chain}/deployments", self.deploy)
        app.router.add_get("/api/data/{size}", self.data)
        app.router.add_get("/api/code/{code}", self.code)
        app.router.add_get("/api/slow5xx", self.slow5xx)
        return app
