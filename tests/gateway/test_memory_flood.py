"""Memory per worker under a flood (issue 9 §8; README "Memory per worker under a flood").

A real `cosmos-gateway serve` (one worker) gets 20,000 requests of each kind that a client controls:
distinct paths, distinct Host headers, distinct valid tokens (a new tenant each), and distinct paths
from a token whose rate limit refuses nearly all of them. Every cache keyed by such input is bounded,
so after the first 10,000 of a kind the worker's memory stops growing; the test asserts the growth of
each kind and of the whole flood, and prints the table the README shows.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from tests.gateway.conftest import StartGateway
from tests.support import GatewayProcess, Upstream, token

MiB = 1 << 20
PER_STEP = 10_000  # requests per measurement; two steps per kind
CONCURRENCY = 16
# Growth allowed per kind over its 20,000 requests, and for the whole flood. What the caches may hold
# (README): matched paths 10,000 entries, compiled checks 20,000 entries / 32 MiB estimated, tokens
# 10,000 / 4 MiB, Forwarded elements 4,096, per-tenant usage series for metrics.max_tenants (10,000)
# tenants; the allocator keeps some of what it was given. New tenants fill most of these at once.
KIND_BOUND = 60 * MiB
TOTAL_BOUND = 80 * MiB
SECOND_STEP_BOUND = 12 * MiB  # the caches are full after the first step: little more may come


@pytest.fixture
def gateway(upstream: Upstream, start_gateway: StartGateway) -> GatewayProcess:
    return start_gateway(
        upstream.url,
        # Distinct paths and tenants must be admitted (and cached), except for the one throttled tenant.
        plans={"starter": {"rate": {"per_second": 1_000_000, "burst": 1_000_000}},
               "professional": {"rate": {"per_second": 1, "burst": 1}}},
        auth={"plan_claim": "plan"},
    )


Request = tuple[str, dict[str, str]]


async def _send(url: str, requests: Iterator[Request], statuses: dict[int, int]) -> None:
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def client() -> None:
            for path, headers in requests:
                async with session.get(url + path, headers=headers) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))


async def _flood(gateway: GatewayProcess, make: Callable[[int], Request]) -> tuple[list[int], dict[int, int]]:
    """RSS before and after each step of PER_STEP requests made by `make(i)`; the statuses seen."""
    statuses: dict[int, int] = {}
    rss = [gateway.rss_bytes()]
    for step in range(2):
        await _send(gateway.url, (make(step * PER_STEP + i) for i in range(PER_STEP)), statuses)
        rss.append(gateway.rss_bytes())
    return rss, statuses


async def test_memory_per_worker_stays_bounded_under_a_flood(gateway: GatewayProcess) -> None:
    fixed = f"Bearer {token('flood-paths')}"
    throttled = f"Bearer {token('flood-throttled', plan='professional')}"
    tokens: dict[int, str] = {}

    def fresh_token(i: int) -> str:
        tokens[i] = tokens.get(i) or f"Bearer {token(f'flood-{i}-{uuid.uuid4().hex[:8]}', sub='u' * 64)}"
        return tokens[i]

    kinds: dict[str, Callable[[int], Request]] = {
        "distinct paths": lambda i: (f"/api/chains/c{i:06d}-{uuid.uuid4().hex}/deployments?x={i}",
                                     {"Authorization": fixed}),
        "distinct Host headers": lambda i: ("/api/chains",
                                            {"Authorization": fixed, "Host": f"h{i}-{uuid.uuid4().hex}.example:8080"}),
        "distinct tokens (tenants)": lambda i: ("/api/chains", {"Authorization": fresh_token(i)}),
        "distinct paths, rate-limited token": lambda i: (f"/api/chains/t{i:06d}-{uuid.uuid4().hex}",
                                                         {"Authorization": throttled}),
    }
    # Warm up: the first requests allocate what every request needs (pools, the scripts, the code).
    await _send(gateway.url, iter([("/api/chains", {"Authorization": fixed})] * 500), {})
    start = gateway.rss_bytes()
    rows = []
    for name, make in kinds.items():
        started = time.monotonic()
        rss, statuses = await _flood(gateway, make)
        assert set(statuses) <= {200, 429}, statuses
        if "rate-limited" in name:
            assert statuses.get(429, 0) > 0.99 * 2 * PER_STEP, statuses
        else:
            assert statuses == {200: 2 * PER_STEP}, statuses
        rows.append((name, rss[1] - rss[0], rss[2] - rss[1], time.monotonic() - started))
        assert rss[2] - rss[0] < KIND_BOUND, (name, [(r - rss[0]) / MiB for r in rss])
        assert rss[2] - rss[1] < SECOND_STEP_BOUND, (name, [(r - rss[0]) / MiB for r in rss])
    total = gateway.rss_bytes() - start
    print(f"\n| flood (one worker) | first {PER_STEP:,} | next {PER_STEP:,} |")
    for name, first, second, seconds in rows:
        print(f"| {name} | {first / MiB:+.1f} MiB | {second / MiB:+.1f} MiB |  ({seconds:.0f} s)")
    print(f"| all {len(rows) * 2 * PER_STEP:,} requests | {total / MiB:+.1f} MiB | |")
    assert total < TOTAL_BOUND, total / MiB
    assert gateway.process is not None and gateway.process.poll() is None

