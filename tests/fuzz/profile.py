"""How long the fuzz suite runs: bounded and seeded in `make test`, long with `make fuzz`.

`FUZZ_EXAMPLES=N` (what `make fuzz` sets) runs N examples per fuzz test, randomly seeded, and keeps
failing examples in `var/hypothesis-fuzz` so the next run tries them first. Without it each test runs
its own small, derandomized budget: the same inputs every run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Verbosity, settings
from hypothesis.database import DirectoryBasedExampleDatabase

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0") or 0)
LONG = EXAMPLES > 0

_COMMON = {
    "deadline": None,  # each example is a round trip to a real process
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    "print_blob": True,  # a failure prints the @reproduce_failure line
    "verbosity": Verbosity.normal,
}


def fuzz_settings(bounded: int) -> settings:
    """`bounded` examples in `make test`; FUZZ_EXAMPLES under `make fuzz`."""
    if LONG:
        return settings(max_examples=EXAMPLES, derandomize=False,
                        database=DirectoryBasedExampleDatabase("var/hypothesis-fuzz"), **_COMMON)
    return settings(max_examples=bounded, derandomize=True, database=None, **_COMMON)
