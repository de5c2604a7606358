"""REPORT.md, MINIMIZATION.md, the fresh-process confirmation and the verifier, from a hand-made reduction (no engine)."""
from dataclasses import asdict, replace
from pathlib import Path

from rollout_lab.config import RunConfig
from rollout_lab.minimize import bug_report
from rollout_lab.minimize.emit import Emitter
from rollout_lab.minimize.fresh import Confirmation, Flip, Verification, run_isolated
from rollout_lab.minimize.report_text import minimization_log, report, title
from rollout_lab.minimize.predicate import FailingRun
from rollout_lab.minimize.knobs import knob_targets
from rollout_lab.minimize.reduce import Reduction, Size
from rollout_lab.minimize.standalone import Case, Expected, Request
from rollout_lab.minimize.trials import Rule, TrialRecord, case_key

ENV = {"vllm": "0.32.0", "torch": "2.13.0+cpu", "transformers": "5.0", "python": "3.11.7", "platform": "Linux", "cpu": "x86", "gpu": "none"}


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


def test_the_title_is_one_a_person_would_write():
    crash = reduction(fault=None, kind="crash")
    assert title(crash, crash.case, "CPU") == "[Bug]: RuntimeError in f with block_size=32 (CPU)"
    silent = reduction()
    assert title(silent, silent.case, "CPU") == (
        "[Bug]: logprobs off transformers' on preempted requests with block_size=32 (CPU) [planted fault]")


def test_a_title_with_many_kept_knobs_keeps_to_100_characters():
    red = reduction(fault=None, kind="crash")
    args = {"dtype": "float32", "block_size": 32, "max_num_seqs": 4, "max_num_batched_tokens": 64, "max_model_len": 256,
            "enable_prefix_caching": True, "enable_chunked_prefill": False, "enforce_eager": False}
    many = replace(red.case, engine_args=args)
    text = title(red, many, "GPU")
    assert len(text) <= bug_report.MAX_TITLE and text.startswith("[Bug]: RuntimeError in f with block_size, ") and "..." in text


COLLECT_ENV = """Collecting environment information...
PyTorch version              : 2.13.0+cpu
Python platform              : Linux-6.18-x86_64-with-glibc2.36
Flags:                                   fpu sse avx2 avx512f avx512_bf16 amx_tile
[pip3] torch==2.13.0+cpu
[pip3] pyzmq==27.3.0
vLLM Version                 : 0.32.0
TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor_root"""
TRACEBACK = """vllm 0.32.0
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/vllm/v1/worker/gpu_model_runner.py", line 3502, in _bookkeeping_sync
    gen.set_offset(gen.get_offset() - 4)
  File "/usr/lib/python3.11/runpy.py", line 1, in run_path
RuntimeError: CPU Generator does not use offset
REPRODUCED: RuntimeError: CPU Generator does not use offset"""


def test_report_follows_vllms_bug_template_within_its_visible_budget():
    red = reduction()
    source = "print('the repro')\n"
    verification = Verification([], 1, 31.0, TRACEBACK, "REPRODUCED: 3 tokens")
    confirmation = Confirmation(red.case, verification, [])
    flips = [Flip("block_size=default", ["NOT REPRODUCED"] * 3), Flip("planted fault off (--no-fault)", ["NOT REPRODUCED"], True)]
    offline = bug_report.Upstream("repo:vllm-project/vllm is:issue logprobs", None, "GitHub not reachable from here: URLError")
    text = report(red, source, COLLECT_ENV, confirmation, flips, "CPU", "/work/x/repro/stale/repro.py", offline)
    assert text.startswith("# [Bug]: logprobs off transformers' on preempted requests")
    for needle in (
        "**Not a vLLM bug as shipped**",
        "- PyTorch version: `2.13.0+cpu`", "- CPU flags: `amx_tile avx2 avx512_bf16 avx512f`", "- packages: `torch==2.13.0+cpu`",
        "```python\nprint('the repro')\n```",
        "- **Expected:** every sampled token's logprob within 0.001",
        "- **Actual:** 3/18 tokens flagged, max diff 4.2",
        '  File "vllm/v1/worker/gpu_model_runner.py", line 3502, in _bookkeeping_sync',
        '  File "python3.11/runpy.py"',
        "- block_size=default: clean 3/3",
        "- planted fault off (--no-fault): clean 1/1",
        "3/18 sampled tokens flagged, on requests [1] of 2 (1 preempted); first bad position 4",
        "`python -m rollout_lab.bisect repro.py --versions A,B,C`",
        "Searched vLLM's issues for `repo:vllm-project/vllm is:issue logprobs`",
        "Not run from here (GitHub not reachable from here: URLError): run it before filing.",
    ):
        assert needle in text, needle
    assert "pyzmq" not in "\n".join(bug_report.visible_lines(text))
    assert "depends on the engine's history" not in text and "DRAFT" not in text
    assert bug_report.problems(text) == []


def test_a_report_of_a_run_given_by_its_absolute_path_names_no_absolute_path():
    """`python -m rollout_lab.minimize /abs/run` of an unlocalized mismatch: the note naming the localize command
    carried the run's absolute path into REPORT.md (test_minimize's high_ids run, issue 35)."""
    red = reduction()
    red = replace(red, run=replace(red.run, run_dir=Path("/home/someone/runs/x")))
    confirmation = Confirmation(red.case, Verification([], 1, 31.0, TRACEBACK, "REPRODUCED: 3 tokens"), [])
    text = report(red, "print(1)\n", COLLECT_ENV, confirmation, [], "CPU", "repro/x/repro.py")
    assert "not localized yet (`python -m rollout_lab.localize x`)" in text
    assert bug_report.problems(text) == []


def test_a_report_of_a_case_the_budget_left_unreduced_is_a_draft():
    red = replace(reduction(fault=None, kind="crash"), budget_spent=True)
    confirmation = Confirmation(red.case, Verification([], 1, 5.0, TRACEBACK, "REPRODUCED: x"), [])
    text = report(red, "print(1)\n", COLLECT_ENV, confirmation, [], "CPU", "repro/x/repro.py")
    assert "> **DRAFT, not ready to file**" in text and "(not measured: the minimization budget" in text
    assert bug_report.problems(text) == []


def test_a_walked_back_case_says_the_failure_depends_on_the_engines_history():
    red = reduction()
    confirmation = Confirmation(red.case, Verification([], 1, 20.0, "", "REPRODUCED: x"), [("small", "NOT REPRODUCED")], steps_back=2)
    text = report(red, "", "env", confirmation, [], "CPU", "repro/x/repro.py")
    assert "The failure depends on the engine's history" in text and "2 reduction(s) before the minimal one" in text
    log = minimization_log(red, confirmation)
    assert "- Before: 4 prompts x 2 samples (8 requests)" in log and "| calibrate | 1 | 1 | 0 | 30 |" in log
    assert "- small: NOT REPRODUCED" in log


class ScriptedEmitter(Emitter):
    """An Emitter whose fresh-process runs are scripted: the verdict per case size (no engine)."""

    def __init__(self, red, verdicts):
        super().__init__(red, Path("."), None, "CPU")
        self.verdicts, self.ran = verdicts, []

    def run(self, case, args=()):
        self.ran.append(len(case.requests))
        verdict = self.verdicts[len(case.requests)]
        return Verification(list(args), {"REPRODUCED": 1, "NOT REPRODUCED": 0}[verdict], 1.0, "", f"{verdict}: scripted")


def chain_reduction() -> Reduction:
    """A reduction whose accepted cases have 8, 6, 4, 2 and 1 requests."""
    red = reduction()
    cases = [replace(red.case, requests=[Request([1, 2], 10 + i, 0, i) for i in range(n)]) for n in (8, 6, 4, 2, 1)]
    records = [TrialRecord(i + 1, case_key(c, red.run.expected), 0, "prompts", f"-> {len(c.requests)}", {}, True, {}, 1.0, case=asdict(c))
               for i, c in enumerate(cases)]
    records.insert(2, TrialRecord(9, "rejected", 0, "prompts", "rejected", {}, False, {}, 1.0, case=asdict(cases[0])))
    return replace(red, case=cases[-1], records=records)


def test_a_minimal_case_that_fails_fresh_is_emitted_as_is():
    emitter = ScriptedEmitter(chain_reduction(), {8: "REPRODUCED", 6: "REPRODUCED", 4: "REPRODUCED", 2: "REPRODUCED", 1: "REPRODUCED"})
    confirmation = emitter.confirm()
    assert len(confirmation.case.requests) == 1 and confirmation.steps_back == 0 and emitter.ran == [1]


def test_a_minimal_case_that_passes_fresh_walks_back_to_the_smallest_that_fails():
    emitter = ScriptedEmitter(chain_reduction(), {8: "REPRODUCED", 6: "REPRODUCED", 4: "REPRODUCED", 2: "NOT REPRODUCED", 1: "NOT REPRODUCED"})
    confirmation = emitter.confirm()
    assert len(confirmation.case.requests) == 4 and confirmation.steps_back == 2
    assert confirmation.verification.verdict == "REPRODUCED"
    assert emitter.ran[0] == 1 and len(emitter.ran) <= 4  # bisection, not every reduction


def test_when_no_reduction_fails_fresh_the_minimal_case_stays_with_its_verdict():
    emitter = ScriptedEmitter(chain_reduction(), dict.fromkeys((8, 6, 4, 2, 1), "NOT REPRODUCED"))
    confirmation = emitter.confirm()
    assert len(confirmation.case.requests) == 1 and confirmation.verification.verdict == "NOT REPRODUCED"


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
    assert (done.returncode, done.verdict) == (0, "NOT REPRODUCED"), done.output


def test_an_exit_1_without_its_verdict_line_cannot_run(tmp_path):
    # Exit 1 is what any traceback, or a missing script, gives: it must not read as reproduced.
    crashing = tmp_path / "crashing.py"
    crashing.write_text("raise FileNotFoundError('model.safetensors')\n")
    missing = run_isolated(Path("no/such/repro.py"))
    for done in (run_isolated(crashing), missing):
        assert done.returncode == 1 and done.verdict == "CANNOT RUN" and done.status == 2, done.output
    assert "no verdict line" in missing.describe()


def test_a_verdict_line_that_disagrees_with_the_exit_status_cannot_run(tmp_path):
    script = tmp_path / "liar.py"
    script.write_text("print('REPRODUCED: yes')\nraise SystemExit(0)\n")
    done = run_isolated(script)
    assert done.verdict == "CANNOT RUN" and "after 'REPRODUCED: yes'" in done.describe()


def test_a_minimal_case_that_cannot_run_is_not_walked_back():
    emitter = ScriptedEmitter(chain_reduction(), dict.fromkeys((8, 6, 4, 2, 1), "REPRODUCED"))
    emitter.run = lambda case, args=(): Verification([], 2, 1.0, "", "CANNOT RUN: out of memory")
    confirmation = emitter.confirm()
    assert len(confirmation.case.requests) == 1 and confirmation.verification.verdict == "CANNOT RUN"
    assert confirmation.walked_back == []


def test_flips_undo_each_trigger_knob_alone_and_switch_the_fault_off():
    red = reduction()  # minimal case: block_size=32 off its default, planted fault stale_state
    red = replace(red, case=replace(red.case, engine_args=red.case.engine_args | {"enable_prefix_caching": False}))
    emitter = ScriptedEmitter(red, {})
    tried = []
    emitter.run = lambda case, args=(): tried.append((case.engine_args, args)) or Verification(list(args), 0, 1.0, "", "NOT REPRODUCED: clean")
    flips = emitter.flips(red.case)
    assert [f.describe() for f in flips] == [
        "gpu_memory_utilization=0.3: clean 1/1",  # cache_size: the lab's stand-in for vLLM's default on CPU
        "block_size=default: clean 1/1",
        "enable_prefix_caching=True: clean 1/1",
        "enforce_eager=True: clean 1/1",
        "planted fault off (--no-fault): clean 1/1",
    ]
    assert [f.fault_off for f in flips] == [False] * 4 + [True]
    # One knob undone at a time: the others stay as the minimal case has them.
    assert tried[1][0] == {"dtype": "float32", "enable_prefix_caching": False}
    assert tried[4] == (red.case.engine_args, ("--no-fault",))


def test_a_kept_block_pool_head_is_named_in_the_title_and_flipped_off_on_its_own():
    red = reduction(fault="index_overflow")
    red = replace(red, case=replace(red.case, block_pool_head=0.8))
    assert "with block_size, block_pool_head (CPU)" in title(red, replace(red.case, fault=None), "CPU")
    emitter = ScriptedEmitter(red, {})
    tried = []
    emitter.run = lambda case, args=(): tried.append(case) or Verification(list(args), 0, 1.0, "", "NOT REPRODUCED: clean")
    flips = emitter.flips(red.case)
    assert [f.describe() for f in flips][-2:] == ["block_pool_head=None: clean 1/1", "planted fault off (--no-fault): clean 1/1"]
    # The head alone goes: the engine arguments stay the minimal case's; every other flip keeps the head.
    assert tried[-2] == replace(red.case, block_pool_head=None)
    assert all(case.block_pool_head == 0.8 for case in tried[:-2] + tried[-1:])
    assert "block_pool_head -> None" in minimization_log(replace(red, run=replace(red.run, case=red.case)), None)


class HistoryEmitter(ScriptedEmitter):
    """Fresh-process runs fail only after a warm-up of at least `need` requests (the engine's history)."""

    def __init__(self, red, need):
        super().__init__(red, {})
        self.need = need

    def run(self, case, args=()):
        self.ran.append((len(case.requests), len(case.warmup)))
        verdict = "REPRODUCED" if len(case.warmup) >= self.need else "NOT REPRODUCED"
        return Verification(list(args), {"REPRODUCED": 1, "NOT REPRODUCED": 0}[verdict], 1.0, "", f"{verdict}: scripted")


def test_a_minimal_case_that_needs_the_engines_history_gets_the_smallest_warm_up_that_fails_fresh():
    red = chain_reduction()
    emitter = HistoryEmitter(red, need=2)
    confirmation = emitter.confirm()
    # The minimal case (1 request) stays; the warm-up: the original 8 requests (all on one prompt: no
    # merge), then halved while a half still fails: 4, 2, and neither single request.
    assert len(confirmation.case.requests) == 1 and confirmation.steps_back == 0
    assert len(confirmation.case.warmup) == 2 and confirmation.case.warmup_max_tokens == red.accepted()[0].max_tokens
    assert confirmation.verification.verdict == "REPRODUCED"
    assert emitter.ran == [(1, 0), (1, 8), (1, 4), (1, 2), (1, 1), (1, 1)]
    assert any("after a warm-up of 2 requests" in size for size, _ in confirmation.walked_back)
    text = report(red, "", "env", confirmation, [], "CPU", "repro/x/repro.py")
    assert "fails once the same engine has served 2 earlier request(s)" in " ".join(text.split())


def test_without_a_warm_up_that_fails_fresh_the_walk_back_remains():
    emitter = ScriptedEmitter(chain_reduction(), {8: "REPRODUCED", 6: "REPRODUCED", 4: "REPRODUCED", 2: "NOT REPRODUCED", 1: "NOT REPRODUCED"})
    confirmation = emitter.confirm()
    assert len(confirmation.case.requests) == 4 and confirmation.steps_back == 2 and not confirmation.case.warmup
