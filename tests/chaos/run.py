"""One chaos run: set up, traffic under the seed's fault schedule, drain, account."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.chaos import schedule
from tests.chaos.accounting import Verdict, check, read_books
from tests.chaos.cluster import ADMIN, BUCKET_SECONDS, GRACE_SECONDS, Cluster
from tests.chaos.traffic import Tenant, Traffic, tenants

TENANTS = 56
SPOOL_DEADLINE = 30.0
DRAIN_DEADLINE = 120.0


@dataclass
class Outcome:
    seed: int
    faults: list[schedule.Fault]
    verdict: Verdict
    requests: int
    statuses: dict[str, int]
    wall: float

    def report(self) -> str:
        lines = [schedule.describe(self.seed, self.faults),
                 f"{self.requests} requests in {self.wall:.1f}s; outcomes {dict(sorted(self.statuses.items()))}",
                 *self.verdict.notes, *self.verdict.table]
        if self.verdict.problems:
            lines += [f"PROBLEMS (seed {self.seed}):", *("  " + p for p in self.verdict.problems)]
        return "\n".join(lines)


async def run(seed: int, seconds: float, kinds: tuple[str, ...], workdir: Path, *,
              abandon_under_redis_faults: bool = True) -> Outcome:
    began = time.monotonic()
    faults = schedule.draw(seed, seconds, kinds)
    print(schedule.describe(seed, faults), flush=True)
    cluster = await Cluster.start(workdir)
    try:
        if not abandon_under_redis_faults:
            cluster.hold_abandons = True
        return await _run(cluster, seed, seconds, faults, began)
    finally:
        await cluster.close()


async def _run(cluster: Cluster, seed: int, seconds: float, faults: list[schedule.Fault],
               began: float) -> Outcome:
    people = tenants(TENANTS)
    traffic = Traffic(lambda: cluster.gateways, lambda: cluster.generations, cluster.abandons_held)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        # aiohttp sends an idempotent request again after a lost connection and then reports the second
        # attempt's error: a refused connect would hide that the first attempt reached a gateway.
        http._retry_connection = False
        await _bind_tenants(cluster, http, people)

        started = time.monotonic()
        injections = [asyncio.ensure_future(cluster.inject(f, started)) for f in faults]
        background: set[asyncio.Task[None]] = set()
        clients = [traffic.run(http, t, random.Random(f"{seed}/{t.name}"), started + seconds, background)
                   for t in people]
        await asyncio.wait_for(asyncio.gather(*clients), seconds + 60)
        await asyncio.wait_for(asyncio.gather(*injections), 60)
        if background:
            await asyncio.wait_for(asyncio.gather(*background), 30)
        cluster.clear_faults()
        if cluster.worker is not None:
            await asyncio.to_thread(cluster.worker.stop)  # from here on `sync --once` drives the drain
            cluster.worker = None
        await _wait_spools(cluster)
        finals = await _drain(cluster, http, traffic, people, seed)
    for gateway in cluster.gateways:
        await asyncio.to_thread(gateway.terminate, 20)
    books = await read_books(cluster, {t.name: t.customer for t in people})
    _dump(cluster, traffic)
    verdict = check(people, traffic, cluster.upstream.served, books, cluster.kills, finals)
    verdict.notes[:0] = cluster.notes
    statuses: dict[str, int] = {}
    for sent in traffic.log:
        label = sent.error or str(sent.status)
        statuses[label] = statuses.get(label, 0) + 1
    return Outcome(seed, faults, verdict, len(traffic.log), statuses, time.monotonic() - began)


def _dump(cluster: Cluster, traffic: Traffic) -> None:
    """Every request as the client and the upstream saw it, and the kills: for the post-mortem of a failure."""
    with (cluster.workdir / "requests.jsonl").open("w") as out:
        for sent in traffic.log:
            served = cluster.upstream.served.get(sent.rid)
            out.write(json.dumps({**dataclasses.asdict(sent),
                                  "served": None if served is None else dataclasses.asdict(served)}) + "\n")
        for kill in cluster.kills:
            out.write(json.dumps({"kill": dataclasses.asdict(kill)}) + "\n")


async def _bind_tenants(cluster: Cluster, http: aiohttp.ClientSession, people: list[Tenant]) -> None:
    """A Stripe customer and a plan per tenant, through both gateways' admin APIs (each applies its own
    change at once; the other instance would take up to 5 s)."""
    for tenant in people:
        cluster.emulator.add_customer(tenant.customer)
    for gateway in cluster.gateways:
        for tenant in people:
            async with http.put(f"{gateway.admin_url}/admin/tenants/{tenant.name}", headers=ADMIN,
                                json={"plan": tenant.plan, "stripe_customer_id": tenant.customer}) as response:
                assert response.status in (200, 201), await response.text()


async def _wait_spools(cluster: Cluster) -> None:
    deadline = time.monotonic() + SPOOL_DEADLINE
    while (pending := await cluster.spool_pending()) > 0:
        assert time.monotonic() < deadline, f"{pending} spooled entries not replayed after {SPOOL_DEADLINE}s"
        await asyncio.sleep(0.25)


async def _drain(cluster: Cluster, http: aiohttp.ClientSession, traffic: Traffic, people: list[Tenant],
                 seed: int) -> dict[str, float]:
    """Move every bucket, net every debit, send everything; returns each tenant's last storage_gb report.

    Late refunds are carried as debits into a later bucket of the period; they net only against usage that
    arrives after the carry. So: move everything, then one more request of each tenant (its last gauge
    report too), move again, and repeat for any debit still left, until `sync --once` exits 0.
    """
    rng = random.Random(f"{seed}/drain")
    finals = {t.name: float(rng.randint(1, 9)) for t in people}
    by_name = {t.name: t for t in people}
    deadline = time.monotonic() + DRAIN_DEADLINE
    await _sync_until_complete(cluster, deadline)
    await asyncio.gather(*(traffic.one(http, t, "data", rng, gauge=finals[t.name], gateway=0) for t in people))
    for round_ in range(5):
        await _sync_until_complete(cluster, deadline)
        books = await read_books(cluster, {t.name: t.customer for t in people})
        debits = {key: value for key, value in books.outstanding.items() if value < 0}
        if not debits or round_ == 4:  # the accounting shows what is left
            break
        # One request per debit, of the meter it is in: a deployment debit nets only with a deployment.
        await asyncio.gather(*(traffic.one(http, by_name[tenant], "deploy" if meter == "chain_deployments"
                                           else "data", rng, gauge=finals[tenant], gateway=0)
                               for tenant, meter in debits))
    return finals


async def _sync_until_complete(cluster: Cluster, deadline: float) -> None:
    """`sync --once` after the open bucket closed, until it says every closed bucket is sent or parked."""
    await asyncio.sleep(BUCKET_SECONDS + GRACE_SECONDS + 0.2)
    while True:
        code, out = await cluster.sync_once()
        if code == 0:
            return
        assert time.monotonic() < deadline, f"sync --once never completed:\n{out[-3000:]}"
        await asyncio.sleep(1.0)
