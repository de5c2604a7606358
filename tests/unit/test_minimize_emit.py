"""The emitted repro.py and REPORT.md, from a hand-made reduction (no engine)."""
import ast
import runpy
import sys
from pathlib import Path

from rollout_lab import faults
from rollout_lab.config import RunConfig
from rollout_lab.minimize.emit import Verification, report, repro_source, run_isolated
from rollout_lab.minimize.predicate import FailingRun
from rollout_lab.minimize.reduce import Reduction, Size, knob_targets
from rollout_lab.minimize.standalone import Case, Expected, Request
from rollout_lab.minimize.trials import Rule, TrialRecord, case_key

ENV = {"vllm": "0.32.0", "torch": "2.13.0+cpu", "transformers": "5.0", "python": "3.11.7", "platform": "Linux", "cpu": "x86", "gpu": "none"}


class FakeTokenizer:
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def reduction(fault="stale_state", kind="mismatch") -> Reduction:
    targets = knob_targets(on_gpu=False)
    expected = Expected(kind, 1e-3, request_class="preempted") if kind == "mismatch" else Expected(kind, 1e-3, crash_key="RuntimeError@vllm/v1/worker/x.py:f")
    big = Case("/models/smollm2", {"dtype": "float32", "block_size": 32, "max_num_seqs": 32}, [Request([1, 2, 3], 11, p, s) for p in range(4) for s in range(2)], 32,
               fault=fault, fault_params={"p": 1.0, "seed": 0} if fault else {})
    small = Case("/models/smollm2", {"dtype": "float32", "block_size": 32}, [Request([2, 3], 11, 1, 0), Request([2, 3], 12, 1, 1)], 9,
                 fault=fault, fault_params=big.fault_params)
    run = FailingRun(Path("runs/x"), "run-1", RunConfig(), 0, big, expected, "5/256 tokens above 0.001 at step 0")
    outcome = {"num_requests": 2, "num_tokens": 18, "num_flagged": 3, "max_abs_diff": 4.2, "request_class": "preempted",
               "num_preempted_requests": 1, "worst": [dict(request=1, position=4, token_id=99, vllm_logprob=-0.1, reference_logprob=-4.3,
                                                           abs_diff=4.2, num_preemptions=1, num_cached_tokens=0)]}
    if kind == "crash":
        outcome = {"crash_key": expected.crash_key, "crash_message": "planted engine_crash at engine step 3"}
    records = [
        TrialRecord(1, case_key(big, expected), 0, "calibrate", "original case, run 1/1", {"requests": 8}, True, outcome, 30.0, 9.0),
        TrialRecord(2, case_key(small, expected), 0, "prompts", "prompts 4 -> 1: [1]", {"requests": 2}, True, outcome, 5.0),
    ]
    return Reduction(run, small, Rule(), Size.of(big, targets), Size.of(small, targets), targets, records, new_trials=2, seconds=40.0)


def load(source: str, tmp_path) -> dict:
    """The repro's globals, run as a module other than __main__ (so main() does not run)."""
    path = tmp_path / "repro.py"
    path.write_text(source)
    return runpy.run_path(str(path), run_name="repro_under_test")


def test_repro_compiles_and_carries_the_fault_source_verbatim(tmp_path):
    source = repro_source(reduction(), "stale", FakeTokenizer(), ENV)
    assert source.startswith('"""[vLLM 0.32.0, CPU] sampled-token logprobs disagree with transformers on requests that were preempted')
    assert "PLANTED FAULT: this failure needs rollout_lab's planted fault `stale_state`" in source
    imported = {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert not [m for m in imported if m.split(".")[0] not in ("vllm", "torch", "transformers", "__future__") and m.split(".")[0] not in sys.stdlib_module_names]
    namespace = load(source, tmp_path)
    assert namespace["CARRIED_SOURCES"]["faults"] == Path(faults.__file__).read_text()
    assert namespace["CASE"].requests[1].seed == 12 and namespace["CASE"].max_tokens == 9
    assert namespace["EXPECTED"].request_class == "preempted"
    # Inside the repro, faults come from the carried source, not from an installed rollout_lab.
    carried = namespace["lab_module"]("faults")
    assert carried.__name__ == "carried_faults" and callable(carried.install)


def test_a_crash_repro_without_fault_carries_only_crash_py(tmp_path):
    source = repro_source(reduction(fault=None, kind="crash"), "crash", FakeTokenizer(), ENV)
    namespace = load(source, tmp_path)
    assert set(namespace["CARRIED_SOURCES"]) == {"crash"}
    assert "PLANTED FAULT" not in source


def test_report_is_a_draft_issue_with_the_reduction_summary():
    text = report(reduction(), "stale", ENV, [Verification([], 1, 31.0, "", "REPRODUCED: 3/18 tokens flagged"),
                                       Verification(["--no-fault"], 0, 29.0, "", "NOT REPRODUCED: no flagged token")])
    assert text.startswith("# [vLLM 0.32.0, CPU] sampled-token logprobs disagree")
    for needle in (
        "**Not a vLLM bug as shipped**",
        "## Environment",
        "- torch: 2.13.0+cpu",
        "## Minimal steps",
        "## Expected",
        "## Actual",
        "3/18 tokens flagged",
        "| 1 | 4 | 99 | -0.1000 | -4.3000 | 4.2 | 1 | 0 |",
        "- Before: 4 prompts x 2 samples (8 requests)",
        "- After: 1 prompts x 2 samples (2 requests)",
        "| calibrate | 1 | 1 | 30 |",
        "`python repro.py --no-fault`: NOT REPRODUCED: no flagged token, exit 0 in 29 s",
    ):
        assert needle in text, needle


def test_run_isolated_sees_site_packages_but_not_rollout_lab(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, rich\n"
        "try:\n    import rollout_lab\nexcept ImportError:\n    print('REPRODUCED: ' + sys.argv[1]); sys.exit(1)\n"
        "sys.exit(99)\n"
    )
    done = run_isolated(script, ("isolated",))
    assert (done.returncode, done.verdict, done.verdict_line) == (1, "REPRODUCED", "REPRODUCED: isolated")


def test_run_isolated_takes_a_relative_path_from_another_directory(tmp_path, monkeypatch):
    (tmp_path / "repro" / "case").mkdir(parents=True)
    (tmp_path / "repro" / "case" / "repro.py").write_text("import sys\nprint('NOT REPRODUCED: clean')\nsys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    done = run_isolated(Path("repro/case/repro.py"))
    assert (done.returncode, done.verdict) == (0, "NOT REPRODUCED"), done.output_tail


def test_an_exit_1_without_its_verdict_line_cannot_run(tmp_path):
    # Exit 1 is what any traceback, or a missing script, gives: it must not read as reproduced.
    crashing = tmp_path / "crashing.py"
    crashing.write_text("raise FileNotFoundError('model.safetensors')\n")
    missing = run_isolated(Path("no/such/repro.py"))
    for done in (run_isolated(crashing), missing):
        assert done.returncode == 1 and done.verdict == "CANNOT RUN" and done.status == 2, done.output_tail
    assert "no verdict line" in missing.describe()


def test_a_verdict_line_that_disagrees_with_the_exit_status_cannot_run(tmp_path):
    script = tmp_path / "liar.py"
    script.write_text("print('REPRODUCED: yes')\nraise SystemExit(0)\n")
    done = run_isolated(script)
    assert done.verdict == "CANNOT RUN" and "after 'REPRODUCED: yes'" in done.describe()
