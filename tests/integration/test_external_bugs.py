"""Bugs planted outside the lab (tests/fixtures/external_bugs, a vLLM general plugin switched by
EXTERNAL_BUG, which `fault=` knows nothing of), each through the user path: a one-step job flags it,
the localizer names the point the plugin corrupts with no fault-off replay, the minimizer shrinks the
run into a repro.py that exits 1 with the plugin on and 0 with it off for a stranger (`python -I
repro.py` in an empty directory, HOME empty), a history-dependent case behind a warm-up of a few
requests that the localizer runs too, and the hunt finds and minimizes it from nothing.

The plugin's ground truth (external_bugs/__init__.py): long_context corrupts layer 0's MLP output at
positions >= 56, mid_layer layer 2's attention output there, warm_engine layer 1's MLP output once
the process has computed 200 rows, abort_then_arrival layer 0's MLP output once a request arrived
after an abort while the engine was busy. long_context runs in the default suite; the others are slow.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from rollout_lab.hunt.store import Store
from rollout_lab.localize import report
from rollout_lab.minimize.handoff import MinimizedResult
from rollout_lab.records import read_records, read_summary

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "tests" / "fixtures" / "external_bugs"
# Each bug's true first point: (kind, layer).
TRUTH = {"long_context": ("mlp", 0), "mid_layer": ("attention", 2), "warm_engine": ("mlp", 1)}
# A small KV cache (64 MB, 15,000 tokens of llama-tiny: no preemption): the default 0.3 of the host's
# memory is 7 GB here, beside other jobs.
JOB = ("model=llama-tiny", "loop.steps=1", "workload.num_prompts=4", "workload.max_tokens=16", "loop.check_weight_sync=false",
       "logger.mode=disabled", "engine.kv_cache_memory_bytes=64000000")
BUGS = [pytest.param("long_context"), pytest.param("mid_layer", marks=pytest.mark.slow),
        pytest.param("warm_engine", marks=pytest.mark.slow)]


def env(bug: str | None) -> dict:
    """This environment with the plugin on (EXTERNAL_BUG=bug, the fixture on PYTHONPATH) or off."""
    base = {k: v for k, v in os.environ.items() if k not in ("EXTERNAL_BUG", "PYTHONPATH")}
    base |= {"HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    paths = [str(REPO)] + ([str(PLUGIN)] if bug else [])
    return base | {"PYTHONPATH": os.pathsep.join(paths)} | ({"EXTERNAL_BUG": bug} if bug else {})


def lab(bug: str, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env(bug), capture_output=True, text=True, timeout=timeout)
    return done


@pytest.fixture(scope="module", params=BUGS)
def bug_run(request, tmp_path_factory):
    """(bug, run dir) of one job step with the bug on: one run per bug, shared by its tests."""
    bug = request.param
    run_dir = tmp_path_factory.mktemp(bug) / "run"
    done = lab(bug, "rollout_lab", *JOB, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return bug, run_dir


def test_the_job_flags_it_and_the_localizer_names_its_true_first_point(bug_run):
    bug, run_dir = bug_run
    summary = read_summary(run_dir)
    table = read_records(run_dir).to_pandas()
    assert summary.status == "ok" and (table.abs_diff > summary.spike_threshold).any()
    # The planted faults' off switch does not exist here: the run has fault=none.
    assert json.loads((run_dir / "config.json").read_text())["fault"]["name"] is None

    done = lab(bug, "rollout_lab.localize", str(run_dir), "--tokens", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = report.read(run_dir / report.DIR_NAME / report.RESULT_NAME)
    flagged = [t for t in result.tokens if t.flagged]
    assert flagged, result.tokens
    for token in flagged:
        point = result.points[token.first]
        assert (point.kind, point.layer) == TRUTH[bug], (token.request, token.position, point.label(), token.rule)
        assert token.rule, token
    text = (run_dir / report.DIR_NAME / report.REPORT_NAME).read_text()
    assert "named by" in text and "clean level" in text


def stranger_python(root: Path, bug: str | None) -> Path:
    """A throwaway venv (`python -I` keeps its own site-packages) that holds this environment's packages
    as plain paths (no .pth run: rollout_lab's editable install stays out) and, for a bug, the plugin."""
    venv.create(root, with_pip=False)
    site = next(root.glob("lib/python*/site-packages"))
    paths = list(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    (site / "lab_env.pth").write_text("\n".join(paths + ([str(PLUGIN)] if bug else [])) + "\n")
    return root / "bin" / "python"


def run_repro(out: Path, bug: str | None, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -I repro.py` in a fresh interpreter in an empty directory, HOME an empty one too, no
    PYTHON*, HF_*, XDG_* or VLLM_* variable, the plugin installed and EXTERNAL_BUG set, or neither."""
    where = tmp_path / f"repro_{bug or 'off'}"
    empty, home = where / "cwd", where / "home"
    empty.mkdir(parents=True), home.mkdir()
    shutil.copy(out / "repro.py", empty / "repro.py")
    python = stranger_python(where / "venv", bug)
    stranger = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "XDG_", "VLLM_", "EXTERNAL_BUG", "ROLLOUT_LAB"))}
    stranger |= {"HOME": str(home)} | ({"EXTERNAL_BUG": bug} if bug else {})
    args = MinimizedResult.read(out).verify_args
    return subprocess.run([str(python), "-I", "repro.py", *args], cwd=empty, env=stranger, capture_output=True, text=True, timeout=600)


def assert_repro_fails_only_with_the_plugin(out: Path, bug: str, tmp_path: Path) -> None:
    on, off = run_repro(out, bug, tmp_path), run_repro(out, None, tmp_path)
    assert on.returncode == 1 and "REPRODUCED: " in on.stdout, on.stdout[-3000:] + on.stderr[-2000:]
    assert off.returncode == 0 and "NOT REPRODUCED: " in off.stdout, off.stdout[-3000:] + off.stderr[-2000:]


@pytest.fixture(scope="module")
def minimized(bug_run, tmp_path_factory):
    """(bug, the minimizer's output dir) for the module's run of the bug."""
    bug, run_dir = bug_run
    out_root = tmp_path_factory.mktemp(f"{bug}_repro")
    done = lab(bug, "rollout_lab.minimize", str(run_dir), "--out", str(out_root), "--name", bug, "--budget-s", "600")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    return bug, out_root / bug


def test_the_minimized_repro_fails_with_the_plugin_on_and_passes_with_it_off(minimized, tmp_path):
    bug, out = minimized
    info = MinimizedResult.read(out)
    if bug == "warm_engine":
        # History-dependent: a small case behind a small warm-up, not the whole step walked back to.
        assert 1 <= info.warmup_requests <= 4 and info.steps_back in (0, None), info
        assert "WARMUP" in (out / "repro.py").read_text()
    else:
        assert info.warmup_requests == 0, info
    assert_repro_fails_only_with_the_plugin(out, bug, tmp_path)


def test_the_localizer_names_a_warm_up_case_behind_its_warm_up(minimized, tmp_path):
    bug, out = minimized
    if bug != "warm_engine":
        pytest.skip("only a history-dependent case has a warm-up")
    done = lab(bug, "rollout_lab.localize", str(out / "case.json"), "--tokens", "2", "--out", str(tmp_path / "loc"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = report.read(tmp_path / "loc" / report.RESULT_NAME)
    assert result.warmup_requests == MinimizedResult.read(out).warmup_requests
    flagged = [t for t in result.tokens if t.flagged]
    assert flagged and all((result.points[t.first].kind, result.points[t.first].layer) == TRUTH[bug] for t in flagged), done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("bug", list(TRUTH))
def test_the_hunt_finds_and_minimizes_it(bug, tmp_path):
    hunt_dir = tmp_path / "hunt"
    done = lab(bug, "rollout_lab.hunt", "hunt=smoke", "hunt.space.models=[llama-tiny]", "hunt.max_groups=1",
               "hunt.workloads_per_engine=2", "hunt.minimize_floor_s=240", f"hydra.run.dir={hunt_dir}", timeout=3000)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    findings = Store(hunt_dir / "hunt.db").findings()
    mismatches = [f for f in findings if f.kind == "mismatch"]
    assert mismatches, [str(f.signature) for f in findings]
    verified = [f for f in mismatches if f.state == "verified"]
    assert verified, [(str(f.signature), f.state, f.why) for f in mismatches]
    # Its repro, as the hunt emitted it, fails only with the plugin on, for a stranger.
    out = next(p.parent for p in sorted((hunt_dir / "repro").glob("*/minimized.json")))
    if bug == "warm_engine":
        assert MinimizedResult.read(out).warmup_requests <= 4
    assert_repro_fails_only_with_the_plugin(out, bug, tmp_path)


# A hunt trial (the hunt's runner and oracles, hunt/runner.run_trial) on a staggered trace: request 0
# aborted after step 2 while request 1 runs, request 2 arriving at step 4; its finding's case.json.
HUNT_TRIAL = """
import os, sys
from pathlib import Path
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from rollout_lab import engine
from rollout_lab.hunt.protocol import Finding
from rollout_lab.hunt.repros import case_file
from rollout_lab.hunt.runner import GroupSpec, run_trial
from rollout_lab.hunt.space import OracleConfig, engine_args
from rollout_lab.hunt.workloads import TraceRequest
from rollout_lab.models import resolve_model
from rollout_lab.reference import load_reference

point = {"model": "llama-tiny", "engine.dtype": "float32", "engine.enforce_eager": True, "engine.kv_cache_memory_bytes": 16_000_000}
workload = {"generator": "timed_trace", "seed": 1, "sampling.max_tokens": 8, "sampling.temperature": 1.0, "sampling.logprobs": 0}
trace = [TraceRequest(list(range(100, 112)), 0, 2), TraceRequest(list(range(300, 309)), 0), TraceRequest(list(range(500, 507)), 4)]
oracles = OracleConfig()
spec = GroupSpec("g", point, resolve_model("llama-tiny"), [], 0.0, oracles=oracles)
llm = engine.start(model=spec.model_path, **(engine_args(point) | {"disable_log_stats": False}))
engine.remember_clean(llm)
result = run_trial(llm, load_reference(spec.model_path), spec, workload, trace, "t", "float32")
print("trial:", result.status, result.num_aborted, "aborted")
if result.status == "fail":
    case_file(Finding(result.signature(point), "t", 0.0, 1, 1, point, workload, result), oracles.reference_tolerance, None, {}).write(Path(sys.argv[1]))
"""


@pytest.mark.slow  # a hunt trial, a minimization (~17 trials, two engine starts) and two fresh repro runs: ~5 min on 2 shared cores
def test_a_staggered_hunt_trial_with_an_abort_minimizes_to_a_repro_that_steps_the_engine(tmp_path):
    """abort_then_arrival needs an abort followed by an arrival: a case collapsed to one generate call
    cannot show it. The minimized repro.py keeps the schedule, steps the engine on it, and fails in a
    fresh process in an empty directory with the plugin on and passes with it off."""
    bug = "abort_then_arrival"
    case_json = tmp_path / "findings" / "t" / "case.json"
    trial = subprocess.run([sys.executable, "-c", HUNT_TRIAL, str(case_json)], cwd=REPO, env=env(bug), capture_output=True,
                           text=True, timeout=600)
    assert trial.returncode == 0 and case_json.is_file(), trial.stdout[-3000:] + trial.stderr[-3000:]
    done = lab(bug, "rollout_lab.minimize", str(case_json), "--out", str(tmp_path / "repro"), "--name", bug,
               "--calibration-runs", "1", "--no-verify")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    at_once = next(line for line in done.stdout.splitlines() if "all at once: every arrival at step 0" in line)
    assert " pass " in at_once, at_once  # one generate call does not show it
    repro = tmp_path / "repro" / bug / "repro.py"
    source = repro.read_text()
    assert "run_schedule(llm, " in source and "llm.generate(" not in source.split("def reproduce", 1)[1]
    schedule = next(ast.literal_eval(node.value) for node in ast.parse(source).body
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SCHEDULE")
    aborts = [abort for _, abort in schedule if abort is not None]
    assert aborts and any(arrival > min(aborts) for arrival, _ in schedule), schedule  # an arrival after the abort
    assert_repro_fails_only_with_the_plugin(repro.parent, bug, tmp_path)
