"""`POST /admin/sync/parked/{identifier}/requeue`: the admin API's form of the console's "retry now", the same
operation (`SyncAdmin.requeue`), audited under the caller's name."""

from __future__ import annotations

import aiohttp
from sqlalchemy import select

from metering.models import AuditEntry, LedgerEntry
from tests.gateway.console.conftest import CI_TOKEN, ConsoleClient, park_row


async def test_the_admin_api_requeues_a_parked_row_once(console: ConsoleClient) -> None:
    identifier = await park_row(console.worker)
    api = f"{console.base}/admin/sync/parked"
    headers = {"Authorization": f"Bearer {CI_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{api}/{identifier}/requeue") as response:
            assert response.status == 200
            body = await response.json()
        assert (body["identifier"], body["tenant"], body["state"], body["reason"]) == (
            identifier, "acme", "pending", "no_customer")
        async with http.post(f"{api}/{identifier}/requeue") as response:  # no longer parked
            assert response.status == 404
            assert response.content_type == "application/problem+json"
        async with http.post(f"{api}/{'x' * 101}/requeue") as response:
            problem = await response.json()
            assert response.status == 400 and problem["errors"][0]["field"] == "identifier"
    async with aiohttp.ClientSession() as http, http.post(f"{api}/{identifier}/requeue") as response:
        assert response.status == 401
    async with console.worker.sessions() as session:
        row = await session.scalar(select(LedgerEntry).where(LedgerEntry.identifier == identifier))
        audit = (await session.scalars(select(AuditEntry))).all()
    assert row is not None and row.state == "pending"
    assert [(entry.actor, entry.action) for entry in audit] == [("token:ci", "sync.requeue")]
