"""Opt-in: the request path compiled with mypyc (issue 12; docs/benchmarks.md has what it gives).

pyproject.toml holds the package's metadata; this file only adds compiled modules, and only when asked:

    COSMOS_MYPYC=1 python setup.py build_ext --inplace      # `make compiled`: .so files next to the sources
    COSMOS_MYPYC=1 pip wheel --no-build-isolation .          # a compiled wheel (mypy and the deps installed)

Without COSMOS_MYPYC (the default: `pip install .`, `make run`, `make test`) nothing is compiled. mypyc
type-checks the modules against the installed dependencies, hence --no-build-isolation for a wheel.
MYPYC_MODULES (paths, space-separated) narrows the list, to try one module at a time.
"""

import os

from setuptools import setup

# The modules every proxied request runs through (cProfile, callgrind: docs/benchmarks.md). Not listed: the
# listener (its classes extend aiohttp's and set class attributes), WebSockets, webhooks, own endpoints.
REQUEST_PATH = [
    "gateway/proxy/handler.py",
    "gateway/proxy/upstream.py",
    "gateway/proxy/upstream_protocol.py",
    "gateway/proxy/response.py",
    "gateway/proxy/headers.py",
    "gateway/proxy/accesslog.py",
    "gateway/proxy/refusals.py",
    "gateway/auth/tokens.py",
    "gateway/metrics.py",
    "quota/limiter.py",
    "quota/compile.py",
    "quota/metrics.py",
    "quota/guards.py",
    "metering/redis_store/store.py",
    "metering/redis_store/batching.py",
    "metering/redis_store/calls.py",
    "metering/redis_store/scripts.py",
    "metering/redis_store/resp.py",
    "metering/redis_store/client.py",
    "metering/keys.py",
    "metering/meters.py",
    "metering/match_cache.py",
    "metering/paths.py",
]

ext_modules = []
if os.environ.get("COSMOS_MYPYC") == "1":
    from mypyc.build import mypycify

    modules = os.environ.get("MYPYC_MODULES", "").split() or REQUEST_PATH
    # Imports outside the list are type-checked only as far as the compiled modules use them.
    ext_modules = mypycify(["--follow-imports=silent", *modules], opt_level="3", debug_level="0")

setup(ext_modules=ext_modules)
