"""engine.args end to end, as a user runs it: a bad argument fails at start with one line (no engine
starts), and a 2-point sweep over a real engine argument runs and is analyzed under its name."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollout_lab.wandb_log import read_offline_run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, says", [
    ("+engine.args.kv_cache_dtyp=fp8", "engine.args.kv_cache_dtyp is not an engine argument of the installed vLLM; did you mean engine.args.kv_cache_dtype"),
    ("+engine.args.kv_cache_dtype=fp9", "engine.args (kv_cache_dtype=fp9): vLLM refuses this engine configuration: 1 validation error for CacheConfig"),
    ("+engine.args.dtype=bfloat16", "engine.args.dtype duplicates a typed knob; use engine.dtype"),
])
def test_a_bad_engine_argument_fails_at_start_with_one_line(tmp_path, override, says):
    result = subprocess.run([sys.executable, "-m", "rollout_lab", override, f"hydra.run.dir={tmp_path}"], cwd=REPO,
                            env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"rollout_lab: {says}"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "records").exists()


# Slow tier (130 s alone: two engines); the fast tier runs a sweep end to end in test_sweep.py and checks
# engine.args against the installed vLLM in tests/unit/test_engine_args.py.
@pytest.mark.slow
def test_a_sweep_over_an_engine_argument_runs_and_is_analyzed_under_its_name(tmp_path):
    # long_prefill_token_threshold caps a prefill's tokens per engine step: 16 splits every prompt.
    sweep_dir = tmp_path / "sweep"
    # Two requests of 8 tokens are enough: every prompt (~40 tokens) is longer than 16.
    tiny = ["workload.num_prompts=2", "workload.samples_per_prompt=1", "workload.max_tokens=8", "loop.steps=1",
            "loop.check_weight_sync=false", "engine.kv_cache_memory_bytes=64000000"]
    result = subprocess.run([sys.executable, "-m", "rollout_lab", "-m", *tiny, "+engine.args.long_prefill_token_threshold=0,16",
                             f"hydra.sweep.dir={sweep_dir}"], cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"},
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    report, output = json.loads((sweep_dir / "sweep_report.json").read_text()), result.stdout + result.stderr
    assert report["variables"] == {"engine.args.long_prefill_token_threshold": [0, 16]}, report["variables"]
    runs = {r["config"]["engine.args.long_prefill_token_threshold"]: r for r in report["runs"] + report["not_run"]}
    assert set(runs) == {0, 16} and runs[0]["outcome"] == "clean", runs
    assert "engine.args.long_prefill_token_threshold" in output
    # The run's own records name the argument: config.json and its W&B config.
    for run_dir in sorted(p for p in sweep_dir.iterdir() if (p / "config.json").is_file()):
        args = json.loads((run_dir / "config.json").read_text())["engine"]["args"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert read_offline_run(summary["wandb_dir"])["config"]["engine"]["args"] == args
        assert set(args) == {"long_prefill_token_threshold"}
