"""The end of a run: Σ Stripe = Σ ledger = Σ billable, per tenant, meter and period, and quotas held.

What "billable" is, precisely (PRODUCT.md §5): a request the upstream received whole and answered below
500 is billed (api_calls, and chain_deployments on the deployments route; bandwidth_bytes its response
body). A refusal of the gateway (429, 503, 401) counts nothing; an answer >= 500 is given back; an
abandoned upload never reached the upstream whole and counts nothing. The upstream's record of what it
answered is therefore the reference, and what clients received must be a part of it.

The one allowed slack is SIGKILL: a killed gateway cannot settle what was in flight. Admission-counted
meters may then keep the unit of a request in flight at the kill (admitted, never forwarded or never
given back): counted ∈ [served, served + in-flight]. Bytes may lose the records of the last 100 ms:
counted ∈ [served - bytes answered in the 100 ms before the kill or in flight, served]. Without a SIGKILL
both bounds close and the check is exact.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import redis.asyncio as aioredis
from sqlalchemy import select

from billing_sync.ledger import STAGING_SUFFIX, parse_bucket_key
from metering.db import create_engine, session_factory
from metering.models import LedgerEntry
from tests.chaos.cluster import PLANS, Cluster, Kill
from tests.chaos.traffic import Sent, Tenant, Traffic
from tests.chaos.upstream import Served

COUNTERS = ("api_calls", "chain_deployments", "bandwidth_bytes")
BYTES_WINDOW = 0.1  # PRODUCT.md §5: a SIGKILL loses at most the last 100 ms of byte records
SETTLE_WINDOW = 0.25  # a refund is recorded in the next batch after the answer: lost with the process too
Key = tuple[str, str, str]  # tenant, meter, period


def period_of(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


@dataclass
class Books:
    stripe: dict[Key, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    stripe_last: dict[Key, Decimal] = field(default_factory=dict)
    sent: dict[Key, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    unsent: dict[Key, Decimal] = field(default_factory=lambda: defaultdict(Decimal))  # parked or pending
    unsent_rows: list[str] = field(default_factory=list)
    gauge_rows: dict[tuple[str, str], list[tuple[datetime, Decimal]]] = field(default_factory=dict)
    outstanding: dict[tuple[str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))


async def read_books(cluster: Cluster, customers: dict[str, str]) -> Books:
    books = Books()
    tenant_of = {customer: tenant for tenant, customer in customers.items()}
    for event in sorted(cluster.emulator.events, key=lambda e: (e.timestamp, e.seq)):
        key = (tenant_of.get(event.customer, event.customer), event.event_name, period_of(event.timestamp))
        books.stripe[key] += event.value
        books.stripe_last[key] = event.value
    engine = create_engine(cluster.database_url)
    try:
        async with session_factory(engine)() as session:
            rows = (await session.scalars(select(LedgerEntry).order_by(LedgerEntry.bucket_start))).all()
    finally:
        await engine.dispose()
    for row in rows:
        start = row.bucket_start.replace(tzinfo=UTC)
        key = (row.tenant_id, row.meter, period_of(start.timestamp()))
        if row.kind == "gauge":
            books.gauge_rows.setdefault((row.tenant_id, row.meter), []).append((start, row.value))
        if row.state == "sent":
            books.sent[key] += row.value
        else:
            books.unsent[key] += row.value
            books.unsent_rows.append(f"{row.tenant_id} {row.meter} {start:%H:%M:%S} {row.value} {row.state} "
                                     f"{row.last_error}")
    client = aioredis.Redis(port=cluster.redis.port)
    try:
        async for raw in client.scan_iter(match="gw:{t:*}:b:*", count=1000):
            name = raw.decode()
            parsed = parse_bucket_key(name.removesuffix(STAGING_SUFFIX))
            if parsed is None:
                continue
            for meter, value in (await client.hgetall(name)).items():
                if meter.decode() in COUNTERS and Decimal(value.decode()):
                    books.outstanding[(parsed[0], meter.decode())] += Decimal(value.decode())
    finally:
        await client.aclose()
    return books


def _at_risk(sent: Sent, kills: list[Kill], window: float) -> bool:
    """In flight (or answered within `window` seconds) when its gateway instance was SIGKILLed."""
    return any(k.gateway == sent.gateway and k.generation == sent.generation and sent.start <= max(k.at, k.done)
               and (sent.end is None or sent.end >= k.at - window) for k in kills)


@dataclass
class Verdict:
    problems: list[str]
    table: list[str]
    notes: list[str]


def check(tenants: list[Tenant], traffic: Traffic, served: dict[str, Served], books: Books, kills: list[Kill],
          finals: dict[str, float]) -> Verdict:
    problems: list[str] = []
    notes: list[str] = []
    table = [f"{'tenant':<11} {'meter':<17} {'period':<7} {'stripe':>9} {'ledger':>9} {'unsent':>6} "
             f"{'redis':>6} {'served':>9} {'slack':>6}"]
    by_rid = {s.rid: s for s in traffic.log}
    periods = {period_of(s.start) for s in traffic.log} | {period_of(s.end) for s in traffic.log if s.end}
    whole_run = len(periods) > 1  # a run across a month boundary: clients are compared over the whole run
    if whole_run:
        notes.append(f"the run crossed a period boundary ({sorted(periods)}): client sums compared over the run")

    expected: dict[Key, Decimal] = defaultdict(Decimal)  # served (billable) per tenant, meter, period
    slack: dict[Key, Decimal] = defaultdict(Decimal)
    for answer in served.values():
        sent = by_rid.get(answer.rid)
        if sent is None or answer.status >= 500:
            continue
        period = "run" if whole_run else period_of(sent.start)
        expected[(answer.tenant, "api_calls", period)] += 1
        if answer.route == "deploy":
            expected[(answer.tenant, "chain_deployments", period)] += 1
        expected[(answer.tenant, "bandwidth_bytes", period)] += answer.size
        if _at_risk(sent, kills, BYTES_WINDOW):
            slack[(answer.tenant, "bandwidth_bytes", period)] += answer.size
    for sent in traffic.log:
        if sent.error == "refused" and sent.rid not in served:
            continue
        period = "run" if whole_run else period_of(sent.start)
        risky = _at_risk(sent, kills, SETTLE_WINDOW)
        if sent.error == "lost" and not risky:
            notes.append(f"{sent.rid} ({sent.tenant} {sent.kind}) lost its answer with no SIGKILL around it")
            risky = True
        if risky:
            slack[(sent.tenant, "api_calls", period)] += 1
            if sent.kind in ("deploy", "slow_deploy", "abandon"):
                slack[(sent.tenant, "chain_deployments", period)] += 1
        if sent.upstream and sent.status is not None and sent.status < 500:
            answer = served.get(sent.rid)
            if answer is None or answer.status != sent.status or answer.size != sent.body:
                problems.append(f"{sent.rid}: the client got {sent.status} ({sent.body} bytes) from the upstream, "
                                f"which recorded {answer}")

    for tenant in tenants:
        for meter in COUNTERS:
            keys = {k for k in [*books.stripe, *books.sent, *books.unsent, *expected]
                    if k[0] == tenant.name and k[1] == meter}
            for key in sorted(keys):
                if books.stripe.get(key, Decimal(0)) != books.sent.get(key, Decimal(0)):
                    problems.append(f"{key}: Stripe holds {books.stripe.get(key, 0)}, the ledger sent "
                                    f"{books.sent.get(key, 0)}")
            ledger = sum((books.sent[k] + books.unsent[k] for k in keys if k in books.sent or k in books.unsent),
                         Decimal(0))
            outstanding = books.outstanding.get((tenant.name, meter), Decimal(0))
            counted = ledger + outstanding
            want = sum((expected[k] for k in keys if k in expected), Decimal(0))
            room = sum((slack[k] for k in keys if k in slack), Decimal(0))
            stripe = sum((books.stripe[k] for k in keys if k in books.stripe), Decimal(0))
            unsent = sum((books.unsent[k] for k in keys if k in books.unsent), Decimal(0))
            table.append(f"{tenant.name:<11} {meter:<17} {'all':<7} {stripe:>9} {ledger - unsent:>9} {unsent:>6} "
                         f"{outstanding:>6} {want:>9} {room:>6}")
            if meter == "bandwidth_bytes":
                ok = want - room <= counted <= want
                bound = f"[{want - room}, {want}]"
            else:
                ok = want <= counted <= want + room
                bound = f"[{want}, {want + room}]"
            if not ok:
                problems.append(f"{tenant.name} {meter}: counted {counted} (ledger {ledger}, still in Redis "
                                f"{outstanding}), billable {bound}")
            if outstanding:
                notes.append(f"{tenant.name} {meter}: {outstanding} still in Redis buckets (a debit not netted yet)")

        final = finals.get(tenant.name)
        for key, last in books.stripe_last.items():
            if key[0] == tenant.name and key[1] == "storage_gb" and final is not None and last != Decimal(str(final)):
                problems.append(f"{key}: Stripe's last storage_gb is {last}, the upstream's last report {final}")
        reported = {Decimal(str(v)) for v in traffic.reported.get(tenant.name, set())}
        for start, value in books.gauge_rows.get((tenant.name, "storage_gb"), []):
            if value not in reported:
                problems.append(f"{tenant.name} storage_gb: ledger bucket {start:%H:%M:%S} holds {value}, "
                                f"never reported (reported {sorted(reported)})")

        limit = PLANS[tenant.plan]["quotas"].get("chain_deployments", {}).get("limit")
        for period in sorted(periods) if limit is not None else ():
            # Admitted = answered by the upstream below 500 (a 409 is billed and uses the quota like a 201).
            admitted = [s for s in traffic.log if s.tenant == tenant.name and s.kind == "deploy" and s.upstream
                        and s.status is not None and s.status < 500 and period_of(s.start) == period]
            ok = [s for s in admitted if 200 <= s.status < 300]  # type: ignore[operator]
            # Only Redis decides quotas; fail_open admits without it (PRODUCT.md §5), and says so by the
            # absence of the quota's RateLimit field.
            decided = [s for s in admitted if "chain_deployments" in s.ratelimit]
            if len(decided) > limit or len([s for s in ok if s in decided]) > limit:
                problems.append(f"{tenant.name} {period}: {len(decided)} deployments admitted by Redis "
                                f"({len([s for s in ok if s in decided])} of them 2xx), limit {limit}")
            if len(admitted) > limit:
                notes.append(f"{tenant.name}: {len(admitted)} deployments served for a limit of {limit}, "
                             f"{len(admitted) - len(decided)} admitted fail-open while Redis could not answer")
    if books.unsent_rows:
        problems.append("ledger rows neither sent nor accepted by Stripe:\n    " + "\n    ".join(books.unsent_rows))
    return Verdict(problems, table, notes)
