"""`make compiled` (setup.py with COSMOS_MYPYC=1, issue 12): the mypyc build works on this machine, and a compiled
module answers as its Python source does. One small module, built in a copy of the tree: the whole request path
takes 1.5 minutes to build, too long for `make test`; docs/benchmarks.md has what it gives and what it costs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from metering import keys
from tests.support import ROOT

TENANTS = ["acme", "a}b", "tenant with spaces", "ünï", "x" * 64]
PROBE = """
import json, sys
from metering import keys
assert keys.__file__.endswith(".so"), keys.__file__
tenants = json.loads(sys.argv[1])
print(json.dumps([[keys.quota_key(t, "api_calls", 1764547200), keys.bucket_key(t, 1764547500),
                   keys.record_key(t, "r-1")] for t in tenants]))
"""


def test_a_module_compiled_with_mypyc_answers_as_its_source(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "metering", tree / "metering", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {**os.environ, "COSMOS_MYPYC": "1", "MYPYC_MODULES": "metering/keys.py"}
    built = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert list((tree / "metering").glob("keys.*.so")), "no compiled metering/keys"

    probe = subprocess.run([sys.executable, "-c", PROBE, json.dumps(TENANTS)], cwd=tree, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tree)})
    assert probe.returncode == 0, probe.stderr[-3000:]
    expected = [[keys.quota_key(t, "api_calls", 1764547200), keys.bucket_key(t, 1764547500), keys.record_key(t, "r-1")]
                for t in TENANTS]
    assert json.loads(probe.stdout) == expected
