"""`GET /admin/sync`, `POST /admin/sync/run` (PRODUCT.md §6) and `POST /admin/sync/parked/{identifier}/requeue`:
the billing sync seen from the admin API.

The state is shared (SQL ledger and Redis), so any gateway instance answers for the sync workers. A
run started here is one ordinary pass: it takes the same leader lock as `cosmos-gateway sync`, so it
never sends alongside a running worker (and identifiers would make that harmless anyway).

`requeue(identifier, actor)` makes one parked ledger row pending again, with its audit entry in the same
transaction: the operation behind the console's "retry now" (an operator fixed the cause first).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.metrics import SyncMetrics
from billing_sync.state import reason_of, sync_state
from billing_sync.worker import SyncWorker
from gateway.admin.tenants import ACTOR
from gateway.errors import InvalidRequest, NotFound
from metering.clock import rfc3339, utcnow
from metering.models import AuditEntry, LedgerEntry


class SyncAdmin:
    def __init__(self, *, redis: Redis | RedisCluster, sessions: async_sessionmaker[AsyncSession],
                 worker_factory: Callable[[], SyncWorker], clock: Callable[[], float]) -> None:
        self._redis = redis
        self._sessions = sessions
        self._worker_factory = worker_factory
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/sync", self.state, allow_head=False), web.post("/sync/run", self.run),
                web.post("/sync/parked/{identifier}/requeue", self.requeue_route)]

    async def snapshot(self) -> dict[str, Any]:
        state = await sync_state(self._redis, self._sessions, now=self._clock())
        parked = [{**p, "bucket_start": rfc3339(p["bucket_start"], whole_seconds=True)} for p in state["parked"]]
        SyncMetrics.state(pending=state["pending"], parked=len(state["parked"]), lag_seconds=state["lag_seconds"])
        return {**state, "last_run_at": rfc3339(state["last_run_at"], whole_seconds=True), "parked": parked}

    async def requeue(self, identifier: str, actor: str) -> dict[str, Any]:
        """One parked row (by its meter event identifier) pending again, due now; audited as `sync.requeue`.

        NotFound when no parked row has that identifier (never parked, already requeued or sent). The row is
        locked while it changes, so two operators retrying it at once write one change and one audit entry.
        """
        async with self._sessions() as session, session.begin():
            row = await session.scalar(select(LedgerEntry).where(LedgerEntry.identifier == identifier,
                                                                 LedgerEntry.state == "parked").with_for_update())
            if row is None:
                raise NotFound("no parked ledger row has this identifier", identifier=identifier[:100])
            before = {"identifier": row.identifier, "meter": row.meter,
                      "bucket_start": rfc3339(row.bucket_start, whole_seconds=True), "state": row.state,
                      "reason": reason_of(row.last_error), "attempts": row.attempts}
            row.state = "pending"
            row.next_attempt_at = None
            session.add(AuditEntry(at=utcnow(self._clock), actor=actor, tenant_id=row.tenant_id,
                                   action="sync.requeue", before=before, after={**before, "state": "pending"}))
        return {**before, "state": "pending", "tenant": row.tenant_id}

    async def requeue_route(self, request: web.Request) -> web.Response:
        identifier = request.match_info["identifier"]
        if not 1 <= len(identifier) <= 100:  # the ledger's identifier column
            raise InvalidRequest("not a meter event identifier", [{"field": "identifier",
                                                                  "message": "1 to 100 characters"}])
        return _json(await self.requeue(identifier, request[ACTOR]))

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
