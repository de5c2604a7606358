"""`python -m rollout_lab.hunt [overrides]`: search engine configurations and workloads for bugs.

    python -m rollout_lab.hunt hunt.budget_s=1800                 # a new hunt dir under hunts/
    python -m rollout_lab.hunt hydra.run.dir=hunts/mine           # resumes hunts/mine if it exists
    python -m rollout_lab.hunt fault=stale_state hunt.budget_s=1200

The pieces, one idea each: driver.py (plan, record, the clock and budget), supervise.py (one group
on Ray, the hang watchdog), runner.py (the group's own process: engine, trials, oracles),
triage.py (what a result is: harness error, known bug, duplicate), repros.py (minimize and
verify), protocol.py (the records and the files between processes), store.py, report.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rollout_lab.hunt.space import HuntRunConfig, register

register()


@hydra.main(version_base=None, config_path="../../conf", config_name="hunt_run")
def main(dict_cfg: DictConfig) -> None:
    from rollout_lab.config import ConfigError
    from rollout_lab.config_keys import check_keys
    from rollout_lab.hunt.driver import Hunt
    from rollout_lab.hunt.store import StoreError

    # vLLM's INFO lines (the driver validates engine configs) would bury the progress lines.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        check_keys(dict_cfg, HuntRunConfig)
        cfg: HuntRunConfig = OmegaConf.to_object(dict_cfg)
        hunt_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
        hunt = Hunt(cfg, hunt_dir)
    except (ConfigError, StoreError, ValueError) as exc:  # a bad signature.txt too (ProtocolError)
        print(f"rollout_lab.hunt: {exc}", file=sys.stderr)
        sys.exit(2)
    hunt.run()


if __name__ == "__main__":
    main()
