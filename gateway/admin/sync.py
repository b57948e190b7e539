"""`GET /admin/sync` and `POST /admin/sync/run` (PRODUCT.md §6): the billing sync seen from the admin API.

The state is shared (SQL ledger and Redis), so any gateway instance answers for the sync workers. A
run started here is one ordinary pass: it takes the same leader lock as `cosmos-gateway sync`, so it
never sends alongside a running worker (and identifiers would make that harmless anyway).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.metrics import SyncMetrics
from billing_sync.state import sync_state
from billing_sync.worker import SyncWorker
from metering.clock import rfc3339


class SyncAdmin:
    def __init__(self, *, redis: Redis | RedisCluster, sessions: async_sessionmaker[AsyncSession],
                 worker_factory: Callable[[], SyncWorker], clock: Callable[[], float]) -> None:
        self._redis = redis
        self._sessions = sessions
        self._worker_factory = worker_factory
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/sync", self.state, allow_head=False), web.post("/sync/run", self.run)]

    async def snapshot(self) -> dict[str, Any]:
        state = await sync_state(self._redis, self._sessions, now=self._clock())
        parked = [{**p, "bucket_start": rfc3339(p["bucket_start"], whole_seconds=True)} for p in state["parked"]]
        SyncMetrics.state(pending=state["pending"], parked=len(state["parked"]), lag_seconds=state["lag_seconds"])
        return {**state, "last_run_at": rfc3339(state["last_run_at"], whole_seconds=True), "parked": parked}

    async def state(self, _: web.Request) -> web.Response:
        return _json(await self.snapshot())

    async def run(self, _: web.Request) -> web.Response:
        worker = self._worker_factory()
        try:
            result = await worker.run_once()
        finally:
            await worker.aclose()
        return _json({"pass": dataclasses.asdict(result), "state": await self.snapshot()})


def _json(data: dict[str, Any]) -> web.Response:
    return web.Response(body=json.dumps(data, default=str).encode(), content_type="application/json")
