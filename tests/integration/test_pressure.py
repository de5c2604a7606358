"""block_pool_head on the real engine: a planted index_overflow past what a small workload reaches is
hit only once the pool's free queue starts near its top, in the RL job and in the hunt, both from
the shipped presets (conf/pressure/high_ids.yaml, conf/hunt/high_ids.yaml; threshold 160 of ~220 blocks)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollout_lab.hunt.store import Store
from rollout_lab.loop import run
from rollout_lab.records import read_records

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
THRESHOLD = 160
FAULT = ["fault=index_overflow", f"fault.params.threshold={THRESHOLD}"]


def high_ids_run(compose, run_dir, *overrides):
    """One RL step of 4 prompts x 2 samples under high_ids with the fault: (result, token table)."""
    cfg = compose("+pressure=high_ids", *FAULT, "loop.steps=1", "loop.check_weight_sync=false", "logger.mode=disabled",
                  "workload.num_prompts=4", "workload.samples_per_prompt=2", "workload.max_tokens=16", *overrides)
    cfg.run_dir = str(run_dir)
    result = run(cfg)
    assert result.status == "ok", result.crash
    return result, read_records(run_dir).to_pandas()


def test_the_rl_job_reaches_the_top_ids_and_the_fault_only_with_the_head_moved(tmp_path, ray_session, compose):
    result, table = high_ids_run(compose, tmp_path / "fresh", "block_pool_head=null")
    assert table.kv_block.max() < THRESHOLD and result.spike_fraction == 0
    result, table = high_ids_run(compose, tmp_path / "head")
    # The head sits at 0.8 x 223 blocks = 178: every request starts there.
    assert table.kv_block.max() >= 178 and result.spike_fraction > 0.5


def test_a_hybrid_models_blocks_and_state_slots_both_move(tmp_path, ray_session, compose):
    result, table = high_ids_run(compose, tmp_path, "model=hybrid-tiny")
    assert table.state_slot.min() >= THRESHOLD and table.kv_block.max() >= THRESHOLD
    assert result.spike_fraction > 0


def hunt(hunt_dir: Path, *overrides: str) -> list[str]:
    """The signatures of the findings of a one-engine high_ids hunt on smollm2 with the fault."""
    command = [sys.executable, "-m", "rollout_lab.hunt", "hunt=high_ids", *FAULT, "hunt.max_groups=1",
               "hunt.space.models=[smollm2]", f"hydra.run.dir={hunt_dir}", *overrides]
    done = subprocess.run(command, cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = Store(hunt_dir / "hunt.db")
    assert store.trials() and all(t.status in ("ok", "fail") for t in store.trials()), [t.status for t in store.trials()]
    return [str(f.signature) for f in store.findings()]


def test_the_hunt_finds_the_overflow_under_high_ids_and_not_on_the_same_engine_without_it(tmp_path):
    assert "mismatch/reference:smollm2:float32:any" in hunt(tmp_path / "high_ids")
    # pressure null: the hunt preset's own engine knobs are high_ids' smollm2 values, ids from 1.
    assert hunt(tmp_path / "fresh", "hunt.space.pressure=[null]") == []
