"""The seeded chaos harness (issue 10 §4). `make test` runs the short run; `make chaos` the long one.

    CHAOS_SEED=7 .venv/bin/python -m pytest -q -p no:cacheprovider tests/chaos -k short   # another seed
    make chaos SECONDS=600 SEED=7                                                           # the long run
    CHAOS_FAULTS=redis_stall,gateway_sigkill ...   # only these fault kinds (default: see below)

A failure prints the seed and the schedule; the same seed draws the same schedule again.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.chaos import schedule
from tests.chaos.run import run

SHORT_SEED = 20261207
SHORT_SECONDS = 22.0
SAFE_KINDS: tuple[str, ...] = schedule.ALL_KINDS
# Uploads abandoned while a Redis fault leaves their checks unresolved: the harness found that such a request
# kept its units when its handler was cancelled just after the store answered (seeds 1 and 6; fixed in
# Limiter.admit). On by default; CHAOS_ABANDON_UNDER_REDIS_FAULTS=0 holds them back.
ABANDON_UNDER_REDIS_FAULTS = os.environ.get("CHAOS_ABANDON_UNDER_REDIS_FAULTS", "1") != "0"
LONG_SECONDS = os.environ.get("CHAOS_SECONDS")


def _kinds() -> tuple[str, ...]:
    wanted = os.environ.get("CHAOS_FAULTS")
    if not wanted:
        return SAFE_KINDS
    kinds = tuple(k.strip() for k in wanted.split(",") if k.strip())
    unknown = set(kinds) - set(schedule.ALL_KINDS)
    assert not unknown, f"unknown fault kinds {sorted(unknown)}; known: {', '.join(schedule.ALL_KINDS)}"
    return kinds


async def _run_and_judge(seed: int, seconds: float, tmp_path: Path) -> None:
    outcome = await run(seed, seconds, _kinds(), tmp_path, abandon_under_redis_faults=ABANDON_UNDER_REDIS_FAULTS)
    report = outcome.report()
    print(report, flush=True)
    assert not outcome.verdict.problems, report


@pytest.mark.timeout(170)
async def test_short_run(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or SHORT_SEED)
    await _run_and_judge(seed, SHORT_SECONDS, tmp_path)


@pytest.mark.skipif(not LONG_SECONDS, reason="the long chaos run: make chaos SECONDS=600 SEED=…")
@pytest.mark.timeout(int(float(LONG_SECONDS or 0)) + 600)
async def test_long_run(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))
    print(f"chaos: long run, seed {seed}, {LONG_SECONDS}s", flush=True)
    await _run_and_judge(seed, float(LONG_SECONDS or 0), tmp_path)
