"""A tensor-parallel sampler end to end from the CLI: placement printed, weight sync into the sharded
engine checked by the probe, a sync that misses a rank reported as sync_mismatch. On CPU the two
ranks are vLLM's multiprocessing executor's, one core each; on two GPUs vLLM's Ray executor's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollout_lab.records import read_requests
from rollout_lab.tolerances import tolerance

pytestmark = pytest.mark.integration

# smollm2 has 9 attention heads, which 2 ranks cannot split; llama-tiny has 4 (2 KV heads).
# lr 1e-2 moves the policy about 3e-3 a step, past the float32 sync tolerance (1e-3), so a rank left with the old weights shows.
# On CPU each rank sizes its own KV cache from gpu_memory_utilization x RAM: an explicit size keeps two ranks small.
TP2_JOB = ["model=llama-tiny", "+engine.args.tensor_parallel_size=2", "loop.steps=2", "workload.num_prompts=4",
           "workload.samples_per_prompt=2", "workload.max_tokens=16", "trainer.learning_rate=1e-2",
           "engine.kv_cache_memory_bytes=64000000", "logger.mode=disabled"]

# Loaded at start by every Python process of the run (Ray's actors, vLLM's rank processes): only
# rank 0 takes the new weights, the classic tensor-parallel sync bug.
BREAK_SYNC = '''
from rollout_lab import weight_sync

_load = weight_sync.WeightSyncExtension.rl_load_weights
weight_sync.WeightSyncExtension.rl_load_weights = lambda self, shipment: _load(self, shipment) if self.rank == 0 else len(shipment.encoded)
'''


def cli(cwd: Path, *args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    """`python -m rollout_lab ARGS` as a user types it, from another working directory."""
    env = os.environ | {"HF_HUB_OFFLINE": "1"} | ({"PYTHONPATH": pythonpath} if pythonpath else {})
    return subprocess.run([sys.executable, "-m", "rollout_lab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow  # 61 s alone: two rank processes; placement is covered by tests/unit/test_placement.py
def test_a_tp2_sampler_runs_clean_and_follows_the_trainers_weights(tmp_path):
    result = cli(tmp_path, *TP2_JOB, "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampler 0: TP 2: rank 0 " in result.stdout and "rank 1 " in result.stdout, result.stdout[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    float32 = tolerance("float32")
    assert summary["status"] == "ok", summary["crash"]
    assert summary["abs_diff_max"] <= float32.spike_threshold
    assert summary["weight_sync_max_diff"] <= float32.weight_sync < summary["policy_change"]
    assert {r.tp_size for r in read_requests(tmp_path / "run")} == {2}


@pytest.mark.slow  # ~115 s beside the clean TP job; run with -m slow
def test_a_sync_that_misses_a_rank_is_a_sync_mismatch(tmp_path):
    (tmp_path / "break").mkdir()
    (tmp_path / "break" / "sitecustomize.py").write_text(BREAK_SYNC)
    result = cli(tmp_path, *TP2_JOB, "hydra.run.dir=run", pythonpath=str(tmp_path / "break"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "sync_mismatch", (summary["crash"], result.stderr[-3000:])
    assert summary["steps_completed"] == 1
    assert summary["weight_sync_max_diff"] > tolerance("float32").weight_sync


def test_a_placement_it_cannot_make_fails_at_start_with_one_line(tmp_path):
    result = cli(tmp_path, "ray.trainer_gpu=own", "logger.mode=disabled")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("rollout_lab:")]
    assert lines == ["rollout_lab: ray.trainer_gpu='own' is not valid; choose one of auto, separate, shared"], result.stderr[-3000:]
