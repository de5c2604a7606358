"""Sweeps end to end, the way a user runs them: `python -m rollout_lab +sweep=<preset> ...` runs a
Hydra multirun of the real RL loop on Ray and ends with the analysis. Tiny points (one or two
RL steps of 4 prompts x 2 samples x 16 tokens) keep each sweep to a few minutes on 2 cores."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollout_lab.wandb_log import read_offline_run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "workload.num_prompts=4",
    "workload.samples_per_prompt=2",
    "workload.max_tokens=16",
    "loop.check_weight_sync=false",
]


def sweep(sweep_dir: Path, *overrides: str) -> tuple[dict, str]:
    """Run a sweep into sweep_dir (overrides after TINY win); returns sweep_report.json and the console output."""
    result = subprocess.run(
        [sys.executable, "-m", "rollout_lab", *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((sweep_dir / "sweep_report.json").read_text()), result.stdout + result.stderr


def verdict(report: dict, variable: str) -> dict:
    return next(v for v in report["verdicts"] if v["variable"] == variable)


def test_index_overflow_over_cache_size_is_structural_and_a_crash_point_is_recorded(tmp_path):
    # 8 prompts x 2 samples need ~24 blocks of 32 tokens at once (a 64-token context is 2 blocks;
    # 1.47 MB a block). Blocks >= 8 are read wrongly: a 12 MB cache (8 blocks) never hands one
    # out, 24 MB (16 blocks) some, 48 MB (32) every block past the 8th. 1 MB holds no request:
    # that point's engine fails to start, a crash result.
    report, output = sweep(
        tmp_path, "+sweep=cache_size", "fault=index_overflow", "fault.params.threshold=8", "engine.max_model_len=64",
        "workload.num_prompts=8", "loop.steps=1", "engine.kv_cache_memory_bytes=1000000,12000000,24000000,48000000",
    )
    outcomes = {r["config"]["engine.kv_cache_memory_bytes"]: r for r in report["runs"]}
    assert outcomes[1000000]["outcome"] == "crash" and outcomes[1000000]["config"]["run_name"] == "cache_size"
    assert [outcomes[size]["outcome"] for size in (12000000, 24000000, 48000000)] == ["clean", "silent", "silent"]
    cache = verdict(report, "engine.kv_cache_memory_bytes")
    assert cache["verdict"] == "structural", cache
    # Structural from the tokens themselves, not only from the crash point.
    assert set(cache["moved"]) - {"crash"}, cache["moved"]
    assert "structural" in output  # the console table
    assert (tmp_path / "SWEEP_REPORT.md").exists() and report["plots"]

    # Every run and the analysis share one W&B group, the sweep's name.
    groups = {r["config"]["logger.group"] for r in report["runs"]}
    assert groups == {tmp_path.name}
    assert read_offline_run(report["wandb_dir"])["summary"]["verdict/engine.kv_cache_memory_bytes"] == "structural"

    # Rerun the analysis with a damaged run: it is reported, the rest analyzed.
    (tmp_path / "2" / "records" / "step_00000.parquet").write_bytes(b"not parquet")
    rerun = subprocess.run([sys.executable, "-m", "rollout_lab.analyze", str(tmp_path), "--wandb", "disabled"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    again = json.loads((tmp_path / "sweep_report.json").read_text())
    assert [b["name"] for b in again["broken"]] == ["2"] and len(again["runs"]) == 3


def test_logit_noise_over_its_scale_is_magnitude_only(tmp_path):
    report, _ = sweep(tmp_path, "+sweep=noise_scale", "fault.params.scale=0.02,0.1", "loop.steps=1")
    scale = verdict(report, "fault.params.scale")
    assert scale["verdict"] == "magnitude-only", scale
    assert all(r["outcome"] == "silent" for r in report["runs"])


def test_clean_model_over_batch_size_is_none(tmp_path):
    report, _ = sweep(tmp_path, "+sweep=batch_size", "workload.num_prompts=2,4", "loop.steps=1")
    batch = verdict(report, "workload.num_prompts")
    assert batch["verdict"] == "none", batch
    assert all(r["outcome"] == "clean" for r in report["runs"])


def test_a_job_that_fails_is_written_down_and_the_sweep_goes_on(tmp_path):
    # loop.steps=0 fails validation inside the job (exit 2) before any engine starts.
    result = subprocess.run(
        [sys.executable, "-m", "rollout_lab", "-m", "loop.steps=0,-1", "logger.mode=disabled", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "failed after" in result.stdout and "the sweep goes on" in result.stdout  # Hydra's log
    for job in ("0", "1"):
        assert (tmp_path / job / "failure.txt").read_text().startswith("SystemExit: 2")
    report = json.loads((tmp_path / "sweep_report.json").read_text())
    assert report["runs"] == [] and [b["name"] for b in report["broken"]] == ["0", "1"]
