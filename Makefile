# The two commands a new user needs (README.md): `make run` and `make test`.
.PHONY: setup run test unit

setup:
	bash scripts/setup.sh

run: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m rollout_lab $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests

unit: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit
