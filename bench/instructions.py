"""`python -m bench.instructions`: the gateway's user-space instructions per request, counted by callgrind.

On a shared VM, requests/s and CPU time swing with whatever else runs on the cores (single rounds of
`make bench` vary by up to 2x); instruction counts do not: valgrind counts them in emulation. So a lever's
effect shows here when `make bench` cannot resolve it. Each gateway runs under
`valgrind --tool=callgrind --instr-atstart=no`: it starts and warms up at full speed, then counts while wrk
sends the scenario for `--seconds`; the figure is callgrind's total over the requests wrk completed. It is the
gateway process's user space only: not the kernel, not Redis, not the time a request waits.

    python -m bench.instructions --targets auth,metered --scenario tenants --rounds 2 [--baseline-tree DIR]

With `--baseline-tree DIR` (an earlier commit's source: `git archive REV | tar -x -C DIR`) each target runs from
both trees in every round, alternated, and the report gives after/before. Needs valgrind, nginx and wrk.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.scenarios import SCENARIOS, run_wrk, write_tokens
from bench.targets import (
    GATEWAYS,
    BenchFailure,
    GatewaySpec,
    check_source,
    require,
    start_gateway,
    start_upstream,
    stop,
)
from gateway.cli.devservices import RedisProcess

WARM_UP_SECONDS = 10
START_SECONDS = 120  # valgrind's start-up, even with instrumentation off
_TOTALS = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="auth,metered", help="gateway targets: auth, metered, metered-log")
    parser.add_argument("--scenario", default="tenants", choices=sorted(SCENARIOS))
    parser.add_argument("--seconds", type=int, default=20, help="counted wrk run per measurement (default 20)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--baseline-tree", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    keys = {spec.key for spec in GATEWAYS}
    args.targets = [t for t in args.targets.split(",") if t]
    if not args.targets or any(t not in keys for t in args.targets):
        parser.error(f"--targets: a comma-separated list of {', '.join(sorted(keys))}")
    return args


def count(spec: GatewaySpec, tree: Path | None, args: argparse.Namespace, workdir: Path, upstream: int,
          redis_url: str, tokens: Path, label: str, wrk: str) -> float:
    """Instructions per request of one gateway run from `tree`, under callgrind."""
    out = workdir / f"callgrind-{label}"
    wrap = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
    server = start_gateway(spec, workdir, upstream, redis_url, 1, tree, wrap=wrap, start_timeout=START_SECONDS)
    scenario = SCENARIOS[args.scenario]
    try:
        run_wrk(wrk, server, scenario, tokens, seconds=WARM_UP_SECONDS, connections=args.connections,
                threads=1, what=f"{label} warm-up")
        control = ["callgrind_control", str(server.process.pid)]
        subprocess.run([*control[:1], "--instr=on", *control[1:]], check=True, capture_output=True)
        result = run_wrk(wrk, server, scenario, tokens, seconds=args.seconds, connections=args.connections,
                         threads=1, what=label)
        subprocess.run([*control[:1], "--instr=off", *control[1:]], check=True, capture_output=True)
        subprocess.run([*control[:1], "--dump", *control[1:]], check=True, capture_output=True)
        dumps = sorted(workdir.glob(f"{out.name}.*"), key=lambda p: p.stat().st_mtime)
        totals = [int(m) for dump in dumps for m in _TOTALS.findall(dump.read_text(errors="replace"))]
        if not totals or max(totals) == 0:
            raise BenchFailure(f"{label}: callgrind dumped no counts")
        return max(totals) / result.requests
    finally:
        stop([server.process])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require("valgrind", "valgrind")
    nginx, wrk = require("nginx", "nginx-light"), require("wrk", "wrk")
    check_source(None)
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.baseline_tree is not None:
        trees.append(("baseline", check_source(args.baseline_tree)))
    specs = [next(s for s in GATEWAYS if s.key == key and not s.baseline) for key in args.targets]
    workdir = Path(tempfile.mkdtemp(prefix="cosmos-instructions-"))
    os.chmod(workdir, 0o755)  # nginx workers run as nobody
    redis = RedisProcess().start()
    upstream = None
    results: dict[tuple[str, str], list[float]] = {}
    try:
        upstream = start_upstream(nginx, workdir, 1)
        tokens = write_tokens(workdir, SCENARIOS[args.scenario], args.tenants)
        for round_no in range(args.rounds):
            order = trees if round_no % 2 == 0 else trees[::-1]
            for spec in specs:
                for name, tree in order:
                    label = f"{spec.key}-{'base' if tree else 'this'}-{round_no}"
                    # Each tree with its own database: a newer tree's migrations must not meet an older tree.
                    run_spec = dataclasses.replace(spec, baseline=tree is not None)
                    value = count(run_spec, tree, args, workdir, upstream.port, redis.url, tokens, label, wrk)
                    results.setdefault((spec.key, name), []).append(value)
                    print(f"round {round_no + 1}/{args.rounds} {spec.label} ({name}): {value / 1000:,.0f}k "
                          f"instructions/request", file=sys.stderr)
        print(f"\n{time.strftime('%Y-%m-%d %H:%M %Z')} · scenario `{args.scenario}`, wrk -c{args.connections}, "
              f"{args.seconds} s counted per run, {args.rounds} rounds; medians\n")
        ratio = " | this / baseline |" if len(trees) > 1 else " |"
        print("| target | " + " | ".join(name for name, _ in trees) + ratio)
        print("|---|" + "---:|" * (len(trees) + (len(trees) > 1)))
        for spec in specs:
            medians = [statistics.median(results[(spec.key, name)]) for name, _ in trees]
            cells = [f"{m / 1000:,.0f}k" for m in medians]
            if len(trees) > 1:
                cells.append(f"{medians[0] / medians[1]:.2f}×")
            print(f"| {spec.label} | " + " | ".join(cells) + " |")
    except BenchFailure as exc:
        sys.exit(f"bench: FAILED: {exc}")
    finally:
        if upstream is not None:
            stop([upstream.process])
        redis.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
