# cosmos-gateway: `make run` starts the gateway, `make test` runs every test.
# Both set up what is missing first: the .venv with the package, and a redis-server binary.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= config/example.yaml

# Development-only secrets so `make run` works out of the box; set your own in production.
DEV_SECRETS := GATEWAY_JWT_HS256_SECRET=$${GATEWAY_JWT_HS256_SECRET:-dev-only-hs256-secret-change-me-0123456789abcdef} \
               GATEWAY_ADMIN_TOKENS=$${GATEWAY_ADMIN_TOKENS:-dev:dev-admin-token-change-me}

.PHONY: run test chromium prometheus fuzz bench bench-proxy bench-sync lint token redis-server clean demo chaos compiled pure

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

redis-server:
	@scripts/ensure-redis.sh

# Debian's chromium for the console's browser tests (tests/gateway/console, Playwright with executable_path).
chromium:
	@scripts/ensure-chromium.sh

# Debian's prometheus and promtool for tests/deploy (alert rules and dashboard checked by the real tools).
prometheus:
	@scripts/ensure-prometheus.sh

run: $(STAMP) redis-server
	@mkdir -p var
	env $(DEV_SECRETS) $(BIN)/cosmos-gateway db upgrade --config $(CONFIG)
	@echo "in another shell:  TOKEN=\$$(make -s token TENANT=acme)"
	@echo "                   curl -H \"Authorization: Bearer \$$TOKEN\" http://127.0.0.1:8080/api/chains"
	exec env $(DEV_SECRETS) $(BIN)/cosmos-gateway serve --config $(CONFIG)

test: $(STAMP) redis-server chromium prometheus
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The fuzz suite at length: FUZZ_EXAMPLES random examples per fuzz test (`make test` runs a small, seeded
# budget of the same tests). Failing examples are kept in var/hypothesis-fuzz and tried first next time.
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP) redis-server
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider --timeout=0 \
		--hypothesis-show-statistics tests/fuzz tests/gateway/admin/test_schemathesis.py $(PYTEST_ARGS)

# The chaos harness at length (tests/chaos, issue 10 §4): SECONDS of traffic under a fault schedule drawn
# from SEED (empty: a random seed, printed), then Σ Stripe = Σ ledger = Σ billable. `make test` runs ~22 s of it.
SECONDS ?= 600
SEED ?=
chaos: $(STAMP) redis-server
	CHAOS_SECONDS=$(SECONDS) CHAOS_SEED=$(SEED) $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/chaos -k long \
		$(PYTEST_ARGS)

demo: $(STAMP) redis-server
	$(BIN)/cosmos-gateway demo --config $(CONFIG)

token: $(STAMP)
	@env $(DEV_SECRETS) $(BIN)/cosmos-gateway token --config $(CONFIG) --tenant $(or $(TENANT),acme)

lint: $(STAMP)
	$(BIN)/ruff check .

# `make bench`: the proxy benchmark (bench/run.py: gateway vs nginx and HAProxy, ~9 minutes by default; nginx,
# wrk and haproxy are installed with apt-get when missing: scripts/ensure-bench-tools.sh), then the sync worker's (bench/sync.py).
# BENCH_ARGS: options of bench/run.py (`.venv/bin/python -m bench.run --help`), e.g. "--scenarios tenants
# --targets haproxy,metered --seconds 3 --rounds 3". BASELINE=DIR (= BENCH_ARGS="--baseline-tree DIR"): also run
# the gateway of the source tree DIR (git archive REV | tar -x -C DIR) as (c') and (d'), alternating with this
# tree's, and report (c)/(c') and (d)/(d'): before/after in one run.
BENCH_ARGS ?=
BASELINE ?=
bench: bench-proxy
	$(BIN)/python -m bench.sync $(BENCH_SYNC_ARGS)

bench-proxy: $(STAMP) redis-server
	@scripts/ensure-bench-tools.sh
	$(BIN)/python -m bench.run $(BENCH_ARGS) $(if $(BASELINE),--baseline-tree $(BASELINE))

bench-sync: $(STAMP)
	$(BIN)/python -m bench.sync $(BENCH_SYNC_ARGS)

# Opt-in (issue 12): the request path compiled with mypyc, as .so files next to the sources (setup.py lists the
# modules; 0.77x the instructions per request, docs/benchmarks.md). Python imports a module's .so before its .py:
# run `make pure` before editing, or the edit does not run. Needs gcc and the Python headers. One run comparing
# both: `git archive HEAD | tar -x -C /tmp/pure && make compiled bench-proxy BASELINE=/tmp/pure`.
compiled: $(STAMP)
	COSMOS_MYPYC=1 $(BIN)/python setup.py build_ext --inplace
	rm -rf build

pure:
	find gateway metering quota billing_sync -name '*.so' -delete
	rm -rf build *__mypyc*.so

clean: pure
	rm -rf $(VENV) var .pytest_cache
