"""A fault schedule drawn from a seed: which fault, when, for how long, against which part.

The schedule is a pure function of (seed, seconds, kinds), so a failing run is replayed by its seed.
Wall-clock interleavings (which request a fault hits) are not reproducible; the faults themselves are,
as in Jepsen's generators.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

# kind -> (the part it occupies, weight). One fault at a time per part: two gateways are never both
# down (traffic always has somewhere to go), and Redis is never partitioned and restarted at once.
KINDS: dict[str, tuple[str, float]] = {
    "redis_replies_lost": ("redis", 3),  # Redis runs the calls, the replies are swallowed, then a cut
    "redis_partition": ("redis", 2),  # requests swallowed before Redis reads them, then a cut
    "redis_stall": ("redis", 3),  # Redis busy in a script past the gateway's 50 ms timeout, answers late
    "redis_restart": ("redis", 1),  # stop (SIGTERM) and start; the chaos Redis keeps its AOF
    "gateway_sigkill": ("gateway", 2),
    "gateway_sigterm": ("gateway", 2),
    "worker_sigkill": ("worker", 1),
    "worker_sigterm": ("worker", 1),
    "two_workers": ("worker", 1),  # a second `sync` daemon beside the first for a while
    "stripe_500": ("stripe", 2),
    "stripe_429": ("stripe", 1),
    "stripe_lost_answers": ("stripe", 2),  # Stripe accepts, the worker hears nothing
    "stripe_dropped": ("stripe", 1),  # the connection is closed before Stripe records anything
}
ALL_KINDS: tuple[str, ...] = tuple(KINDS)


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after traffic starts
    kind: str
    duration: float  # how long the fault lasts (a process: how long it stays down)
    target: int = 0  # which gateway
    count: int = 0  # Stripe faults: how many requests

    def describe(self) -> str:
        extra = f" gateway={self.target}" if KINDS[self.kind][0] == "gateway" else ""
        extra += f" n={self.count}" if self.count else ""
        return f"t={self.at:6.2f}s {self.kind:<19} for {self.duration:.2f}s{extra}"


def draw(seed: int, seconds: float, kinds: Iterable[str], *, mean_gap: float = 1.6) -> list[Fault]:
    """Faults over [1, seconds - 2], about one every `mean_gap` seconds, non-overlapping per part."""
    chosen = [k for k in ALL_KINDS if k in set(kinds)]
    if not chosen:
        return []
    rng = random.Random(seed)
    busy_until: dict[str, float] = {}
    faults: list[Fault] = []
    at = 1.0
    while True:
        at += rng.expovariate(1 / mean_gap)
        if at > seconds - 2:
            return faults
        kind = rng.choices(chosen, weights=[KINDS[k][1] for k in chosen])[0]
        part = KINDS[kind][0]
        duration = _duration(rng, kind)
        if busy_until.get(part, 0.0) > at:
            continue  # drawn anyway, so the rest of the schedule does not depend on the skip
        # A process fault also waits for the restart (a gateway needs about a second to listen again).
        busy_until[part] = at + duration + (2.5 if part in ("gateway", "worker") else 0.3)
        count = rng.randint(3, 15) if part == "stripe" else 0
        faults.append(Fault(round(at, 3), kind, round(duration, 3), rng.randrange(2), count))


def _duration(rng: random.Random, kind: str) -> float:
    if kind in ("redis_replies_lost", "redis_partition", "redis_stall"):
        return rng.uniform(0.2, 0.8)  # "a few hundred ms", always past the 50 ms hot-path timeout
    if kind == "redis_restart":
        return rng.uniform(0.5, 2.0)
    if kind == "two_workers":
        return rng.uniform(3.0, 8.0)
    if kind.startswith(("gateway", "worker")):
        return rng.uniform(0.2, 1.5)
    return 0.0


def describe(seed: int, faults: list[Fault]) -> str:
    lines = [f"chaos seed {seed}: {len(faults)} faults"] + ["  " + f.describe() for f in faults]
    return "\n".join(lines)
