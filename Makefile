# `make serve`: set up, then serve the embedded default (CPU) on http://127.0.0.1:8000/v1
# `make test`:  set up, then run the whole test suite (unit + real app with vLLM's CPU engine)
.PHONY: setup serve test test-unit bench

# Python writes byte-code for what the app and tests import, once (setup compiles only the main imports: see
# scripts/setup.sh), also where the environment says PYTHONDONTWRITEBYTECODE=1.
export PYTHONDONTWRITEBYTECODE =

setup:
	scripts/setup.sh

# Ray starts workers at nice 15 by default; vLLM's engine processes inherit it.
# HAProxy mode: clients reach the router's own HTTP server, no Ray message carries response bytes;
# haproxy-with-parent: HAProxy stops with Ray (Ray 2.60 would leave it holding port 8000).
# Serve's control loop at 1 Hz, not 10: the idle controller's CPU 2.6% -> 0.9% (measured here; 2 Hz: 1.2%).
# One HAProxy thread, not Serve's 4: on 2 cores HAProxy used 28-30 instead of 48-55 CPU-us per streamed token
# (the Python router saturates long before one HAProxy thread).
# --address local: a Ray of its own, not the last cluster recorded in /tmp/ray (possibly long gone).
SERVE_ENV = RAY_worker_niceness=0 RAY_SERVE_CONTROL_LOOP_INTERVAL_S=1 RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_NBTHREAD=1 \
	RAY_SERVE_HAPROXY_BINARY_PATH=$(CURDIR)/.venv/bin/haproxy-with-parent

serve: setup
	$(SERVE_ENV) .venv/bin/serve run --address local serve_configs/cpu.yaml

# TEST_WORKERS=N runs N pytest-xdist workers (0: one process); each integration group (one app and its tests) runs
# whole in one worker, the longest groups first (tests/conftest.py).
TEST_WORKERS ?= 2

test: setup
	.venv/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -v -rs --durations=25

test-unit: setup
	.venv/bin/python -m pytest -v -m "not integration"

bench: setup
	.venv/bin/python scripts/bench.py
