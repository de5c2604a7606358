# The two commands a new user needs (README.md): `make run` and `make test`.
# `make test` is the fast tier, `make test-slow` the full-size end-to-end runs (docs/testing.md);
# .ci/run runs the fast tier; `make test-long` the few runs too long for CI (marked `long`).
# TEST_ARGS passes pytest options, e.g. `make test TEST_ARGS=--reverse`.
# TEST_WORKERS pytest-xdist processes (default 2, this 2-core machine's count; 0 runs in one process):
# the tests reading one run fixture go to one worker, every other test is a group of its own (tests/conftest.py).
.PHONY: setup run test test-slow test-long unit

TEST_WORKERS ?= 2
PYTEST = HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=10 --durations-min=5 $(TEST_ARGS)

setup:
	bash scripts/setup.sh

run: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m rollout_lab $(ARGS)

test: setup
	$(PYTEST) -m "not slow and not long" tests

test-slow: setup
	$(PYTEST) -m "slow and not long" tests

test-long: setup
	$(PYTEST) -m long tests

unit: setup
	$(PYTEST) tests/unit
