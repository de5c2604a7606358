"""Sweeps end to end, the way a user runs them: `python -m rollout_lab +sweep=<preset> ...` runs a
Hydra multirun of the real RL loop on Ray and ends with the analysis. Tiny points (one RL step of
4 prompts x 2 samples x 16 tokens, a 64 MB KV cache) keep each sweep to a few minutes on 2 cores.

The sweeps over real engines are slow-tier (70-220 s each alone, an engine per point). The fast tier
covers their stages: the multirun through the Ray launcher into the analysis callback (the last test
here, whose jobs stop before an engine starts) and the verdicts on recorded runs (tests/unit/test_analysis*.py)."""
import json
import os
import shutil
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
    "loop.steps=1",
    # vLLM CPU would otherwise take a share of the machine's memory per engine.
    "engine.kv_cache_memory_bytes=64000000",
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


def analyze(sweep_dir: Path) -> dict:
    """`python -m rollout_lab.analyze` on a sweep dir (no W&B); returns sweep_report.json."""
    result = subprocess.run([sys.executable, "-m", "rollout_lab.analyze", str(sweep_dir), "--wandb", "disabled"],
                            cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((sweep_dir / "sweep_report.json").read_text())


@pytest.mark.slow
def test_index_overflow_over_cache_size_states_its_threshold_and_a_refused_point_is_not_run(tmp_path):
    # 8 prompts x 2 samples need ~24 blocks of 32 tokens at once (a 64-token context is 2 blocks;
    # 1.47 MB a block). Blocks >= 8 are read wrongly: a 12 MB cache (8 blocks) never hands one
    # out, 24 MB (16 blocks) some, 48 MB (32) every block past the 8th. 1 MB holds no request:
    # vLLM refuses to start that engine (KV cache too small for max_model_len): not run.
    sweep_dir = tmp_path / "sweep"
    report, output = sweep(
        sweep_dir, "+sweep=cache_size", "fault=index_overflow", "fault.params.threshold=8", "engine.max_model_len=64",
        "workload.num_prompts=8", "engine.kv_cache_memory_bytes=1000000,12000000,24000000,48000000",
    )
    (refused,) = report["not_run"]
    assert refused["config"]["engine.kv_cache_memory_bytes"] == 1000000 and refused["config"]["run_name"] == "cache_size"
    assert refused["outcome"] == "not run" and refused["refusal"].startswith("ValueError: No available memory for the cache blocks")
    outcomes = {r["config"]["engine.kv_cache_memory_bytes"]: r["outcome"] for r in report["runs"]}
    assert outcomes == {12000000: "clean", 24000000: "silent mismatch", 48000000: "silent mismatch"}
    cache = verdict(report, "engine.kv_cache_memory_bytes")
    assert cache["verdict"] == "structural", cache
    assert cache["values"] == [12000000, 24000000, 48000000] and cache["threshold"] == [12000000, 24000000] and cache["monotone"]
    assert cache["sentence"].startswith("fails from engine.kv_cache_memory_bytes >= 24000000 (clean at 12000000)"), cache["sentence"]
    assert cache["sentence"].endswith("not run at 1000000 (vLLM refused the configuration)")
    assert cache["next_sweep"].endswith("engine.kv_cache_memory_bytes=14000000,16000000,18000000,20000000,22000000")
    assert "+sweep=cache_size" in cache["next_sweep"] and "fault=index_overflow" in cache["next_sweep"]
    # Structural from the tokens themselves too, not only from the switch of outcome class.
    assert set(cache["moved"]) - {"outcome"}, cache["moved"]
    assert "structural" in output and "next sweep: python -m rollout_lab -m" in output  # the console
    text = (sweep_dir / "SWEEP_REPORT.md").read_text()
    assert "## Not run: configurations vLLM refused at start" in text and cache["sentence"] in text
    assert report["plots"]

    # The same sweep without the refused point (its job dir left out) gives the same verdict.
    without = tmp_path / "without_refused"
    for job in ("1", "2", "3"):
        shutil.copytree(sweep_dir / job, without / job)
    alone = analyze(without)
    assert alone["not_run"] == [] and len(alone["runs"]) == 3
    same = verdict(alone, "engine.kv_cache_memory_bytes")
    assert (same["verdict"], same["threshold"], same["moved"]) == (cache["verdict"], cache["threshold"], cache["moved"])
    assert cache["sentence"] == same["sentence"] + "; not run at 1000000 (vLLM refused the configuration)"

    # Every run and the analysis share one W&B group, the sweep's name.
    groups = {r["config"]["logger.group"] for r in report["runs"] + report["not_run"]}
    assert groups == {sweep_dir.name}
    summary = read_offline_run(report["wandb_dir"])["summary"]
    assert summary["verdict/engine.kv_cache_memory_bytes"] == "structural" and summary["runs_not_run"] == 1

    # Rerun the analysis with a damaged run: it is reported, the rest analyzed.
    (sweep_dir / "2" / "records" / "step_00000.parquet").write_bytes(b"not parquet")
    again = analyze(sweep_dir)
    assert [b["name"] for b in again["broken"]] == ["2"] and len(again["runs"]) == 2 and len(again["not_run"]) == 1


@pytest.mark.slow
def test_a_fault_switched_on_by_batch_size_is_structural_over_max_num_seqs_and_its_clean_runs_are_none(tmp_path):
    # batch_threshold corrupts every logit of an engine step that schedules >= 4 requests: with
    # 8 requests in flight, max_num_seqs 1 and 2 never reach it, 8 does.
    sweep_dir = tmp_path / "sweep"
    report, output = sweep(sweep_dir, "+sweep=max_num_seqs", "fault=batch_threshold", "engine.max_num_seqs=1,2,8",
                           "logger.mode=disabled")
    outcomes = {r["config"]["engine.max_num_seqs"]: r["outcome"] for r in report["runs"]}
    assert outcomes == {1: "clean", 2: "clean", 8: "silent mismatch"}
    seqs = verdict(report, "engine.max_num_seqs")
    assert seqs["verdict"] == "structural" and "outcome" in seqs["moved"], seqs
    assert seqs["sentence"].startswith("fails from engine.max_num_seqs >= 8 (clean at 1, 2)"), seqs["sentence"]
    assert seqs["threshold"] == [2, 8] and seqs["monotone"] is True
    assert seqs["next_sweep"].endswith("engine.max_num_seqs=3,4,5,6,7") and "fault=batch_threshold" in seqs["next_sweep"]
    assert f"next sweep: {seqs['next_sweep']}" in output

    # Its clean runs alone are a sweep where nothing fails: verdict none (they are the runs a
    # clean sweep of their own would start again).
    clean_dir = tmp_path / "clean"
    for run in report["runs"]:
        if run["outcome"] == "clean":
            shutil.copytree(sweep_dir / run["name"], clean_dir / run["name"])
    clean = verdict(analyze(clean_dir), "engine.max_num_seqs")
    assert clean["verdict"] == "none", clean
    assert clean["sentence"] == "clean at every value (1, 2): engine.max_num_seqs does not switch a failure on here"


@pytest.mark.slow
def test_logit_noise_over_its_scale_is_magnitude_only(tmp_path):
    report, _ = sweep(tmp_path, "+sweep=noise_scale", "fault.params.scale=0.02,0.1", "logger.mode=disabled")
    scale = verdict(report, "fault.params.scale")
    assert scale["verdict"] == "magnitude-only", scale
    assert "outcome" not in scale["moved"] and scale["threshold"] is None and scale["next_sweep"] is None
    assert "scales the failure, it does not switch it on" in scale["sentence"], scale["sentence"]
    assert all(r["outcome"] == "silent mismatch" for r in report["runs"])


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
    assert report["runs"] == report["not_run"] == [] and [b["name"] for b in report["broken"]] == ["0", "1"]
