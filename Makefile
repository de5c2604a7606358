# The two commands a new user needs (README.md): `make run` and `make test`.
.PHONY: setup run test test-slow unit

setup:
	bash scripts/setup.sh

run: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m rollout_lab $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m "not slow" tests

test-slow: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m slow tests

unit: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit
