"""The minimizer end to end: a failing run dir in, a repro.py that fails standalone out.

The failing runs are made directly (one sampler step and the trainer's logprobs, as loop.run
writes them, without Ray or the update) to keep the suite short; the minimizer runs as a user
runs it (`python -m rollout_lab.minimize`), and each emitted repro.py runs in a fresh interpreter
where rollout_lab cannot be imported.
"""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rollout_lab.calibrate import threshold_for
from rollout_lab.config import RunConfig
from rollout_lab.crash import EngineCrash
from rollout_lab.minimize.emit import run_isolated
from rollout_lab.minimize.reduce import deviating_knobs, knob_targets
from rollout_lab.minimize.trials import read_log
from rollout_lab.models import resolve_model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def direct_run(run_dir: Path, cfg: RunConfig) -> Path:
    """Step 0 of cfg's run, sampled by a SamplerWorker and scored by the Trainer, written like loop.run."""
    from transformers import AutoTokenizer

    from rollout_lab.models import resolve_model
    from rollout_lab.records import token_table, write_step
    from rollout_lab.sampler import PromptRequest, SamplerWorker
    from rollout_lab.trainer import Trainer
    from rollout_lab.workload import encode_prompt, make_problems

    cfg.run_dir, cfg.engine.record_schedule = str(run_dir), False
    model_path = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    problems = make_problems(cfg.workload.num_prompts, cfg.workload.prompt_seed)
    requests = [PromptRequest(i, encode_prompt(tokenizer, p)) for i, p in enumerate(problems)]
    summary = {"run_id": run_dir.name, "status": "ok", "spike_threshold": threshold_for(cfg)[0]}
    worker = SamplerWorker(cfg, 0, model_path)
    try:
        worker.ready()
        batch = worker.generate(0, requests)
    except EngineCrash as crash:
        summary |= {"status": "crash", "crash": crash.signature.to_dict()}
    else:
        logprobs = Trainer(model_path, cfg.trainer).logprobs([(s.prompt_token_ids, s.token_ids) for s in batch.samples])
        write_step(run_dir, 0, token_table(run_dir.name, batch, logprobs, [0.0] * len(logprobs)))
    finally:
        worker.llm.llm_engine.engine_core.shutdown()
    (run_dir / "config.json").write_text(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg))))
    (run_dir / "summary.json").write_text(json.dumps(summary))
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
    assert failing.verdict == "REPRODUCED", failing.output_tail
    assert failing.seconds < 60, f"repro took {failing.seconds:.0f} s"
    if with_fault_off:
        clean = run_isolated(repro, (*args, "--no-fault"))
        assert clean.verdict == "NOT REPRODUCED", clean.output_tail


@pytest.fixture(scope="module")
def stale_state_run(tmp_path_factory) -> Path:
    """A default-size stale_state run (8 prompts x 4 samples x 32 tokens) under +pressure=kv_tight."""
    cfg = RunConfig(run_name="stale_state")
    cfg.fault.name = "stale_state"
    for key, value in OmegaConf.load(REPO / "conf" / "pressure" / "kv_tight.yaml").engine.items():
        setattr(cfg.engine, key, value)
    return direct_run(tmp_path_factory.mktemp("stale_state_run"), cfg)


def test_stale_state_shrinks_to_two_prompts_and_only_the_knobs_that_matter(stale_state_run, tmp_path):
    out = minimize(stale_state_run, tmp_path, "stale", "--calibration-runs", "1")
    script = emitted_case(out / "repro.py")
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
    assert report.startswith("# [Bug]: ") and "### What makes it go away" in report and "Not a vLLM bug as shipped" in report
    # smollm2's repro names the hub weights; the lab's copy is passed as --model.
    assert_standalone_repro(out / "repro.py", True, "--model", str(resolve_model("smollm2")))


def test_engine_crash_shrinks_to_its_triggering_call(tmp_path_factory, tmp_path):
    cfg = RunConfig(run_name="engine_crash")
    cfg.fault.name = "engine_crash"
    cfg.workload.num_prompts, cfg.workload.samples_per_prompt, cfg.workload.max_tokens = 4, 2, 8
    run_dir = direct_run(tmp_path_factory.mktemp("engine_crash_run"), cfg)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "crash"

    out = minimize(run_dir, tmp_path, "crash", "--calibration-runs", "1")
    script = emitted_case(out / "repro.py")
    assert script["CRASH"][0] == "RuntimeError"
    # at_step=3 needs a 4th engine step: one request of 4 tokens, nothing more.
    assert len(script["REQUESTS"]) == 1 and script["SAMPLING"]["max_tokens"] == 4
    assert deviating_knobs(script["ENGINE_ARGS"], knob_targets(on_gpu=False)) == []
    assert_standalone_repro(out / "repro.py", True, "--model", str(resolve_model("smollm2")))


def test_the_cli_with_its_defaults_from_another_directory_verifies_for_real(tmp_path_factory, tmp_path):
    """`python -m rollout_lab.minimize runs/x` in a user's own directory: --out repro is relative there."""
    cfg = RunConfig(run_name="engine_crash")
    cfg.fault.name = "engine_crash"
    cfg.workload.num_prompts, cfg.workload.samples_per_prompt, cfg.workload.max_tokens = 2, 1, 8
    (tmp_path / "runs" / "crash").mkdir(parents=True)
    direct_run(tmp_path / "runs" / "crash", cfg)
    done = subprocess.run(
        [sys.executable, "-m", "rollout_lab.minimize", "runs/crash", "--calibration-runs", "1"],
        cwd=tmp_path, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "repro" / "engine_crash-crash" / "REPORT.md").read_text()
    assert "REPRODUCED: RuntimeError in " in report
    assert "- planted fault off (--no-fault): clean 1/1" in report
