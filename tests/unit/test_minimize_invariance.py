"""The minimizer's batch-invariance expectation, without an engine: the bitwise comparison on hand-made
outputs, the predicate, the case handed over from the hunt, the reducer's floor of two requests, and the
emitted repro.py run against a stand-in vllm."""
import ast
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from rollout_lab.engine import SampledOutput
from rollout_lab.minimize.handoff import CaseFile
from rollout_lab.oracles.batch_invariance import batch_outcome
from rollout_lab.minimize.script import LINE_BUDGET, ReproSpec, budget_lines, repro_source
from rollout_lab.minimize.standalone import Case, Expected, Outcome, Request, same_failure
from rollout_lab.minimize.trials import TrialRecord

BATCH = Expected("batch_invariance", 0.0, targets=2)
ENV = {"VLLM_BATCH_INVARIANT": "1", "VLLM_USE_V2_MODEL_RUNNER": "1"}


def out(tokens: list[int], logprobs: list[float], cached: int = 0) -> SampledOutput:
    return SampledOutput(0, "0", 0, [1, 2], tokens, logprobs, [{t: lp} for t, lp in zip(tokens, logprobs)], 0, cached, "length", None)


def test_identical_outputs_alone_and_in_the_batch_are_no_failure():
    batch = [out([5, 6, 7], [-0.5, -1.25, -2.0]), out([8, 9], [-0.1, -0.2]), out([3], [-3.0])]
    outcome = batch_outcome(batch, [out([5, 6, 7], [-0.5, -1.25, -2.0]), out([8, 9], [-0.1, -0.2])])
    assert (outcome.num_requests, outcome.targets, outcome.differing, outcome.num_tokens) == (3, 2, [], 5)
    assert outcome.max_abs_diff == 0.0 and outcome.first_token_diff is None and not same_failure(BATCH, outcome)


def test_one_ulp_on_one_logprob_is_a_difference():
    lp = np.float32(-1.25)
    nudged = float(np.nextafter(lp, np.float32(0)))
    batch = [out([5, 6], [-0.5, float(lp)]), out([8, 9], [-0.1, -0.2])]
    outcome = batch_outcome(batch, [out([5, 6], [-0.5, nudged]), out([8, 9], [-0.1, -0.2])])
    assert outcome.differing == [0] and outcome.first_token_diff is None and outcome.num_flagged == 1
    assert outcome.max_abs_diff == pytest.approx(abs(nudged - float(lp))) and outcome.max_abs_diff > 0
    worst = outcome.worst[0]
    assert (worst.request, worst.position, worst.token_id, worst.vllm_logprob, worst.reference_logprob) == (0, 1, 6, float(lp), nudged)
    assert same_failure(BATCH, outcome)


def test_another_token_ends_the_comparison_there_and_is_a_difference():
    # Position 0's logprob differs, then the sampled token at position 1: positions after it are other sequences.
    batch = [out([5, 6, 7], [-0.5, -1.0, -9.0]), out([8, 9], [-0.1, -0.2])]
    alone = [out([5, 4, 7], [-0.75, -2.0, -0.1]), out([8], [-0.1])]  # the second one ended a token early
    outcome = batch_outcome(batch, alone)
    assert outcome.differing == [0, 1] and outcome.first_token_diff == 1
    assert outcome.max_abs_diff == 0.25 and outcome.num_flagged == 1
    assert outcome.describe() == "2/2 targets differ alone vs in a batch of 2 (max |diff| 0.25, first other token at position 1)"


def test_a_batch_of_one_or_a_crash_is_not_the_failure():
    differing = Outcome(num_requests=2, targets=1, differing=[0], max_abs_diff=0.1)
    assert same_failure(BATCH, differing)
    assert not same_failure(BATCH, Outcome(num_requests=1, targets=1, differing=[0]))  # the same run twice
    assert not same_failure(BATCH, Outcome(crash_key="E@vllm/a.py:f", num_requests=2, differing=[0]))
    # The other kinds do not read the batch fields.
    assert not same_failure(Expected("mismatch", 1e-3, request_class="any"), differing)


def test_the_outcome_reads_back_from_the_trial_log():
    outcome = batch_outcome([out([5, 6], [-0.5, -1.0]), out([8], [-0.1])], [out([5, 6], [-0.5, -1.5])])
    record = TrialRecord(1, "k", 0, "calibrate", "original", {}, True, asdict(outcome), 1.0)
    assert record.result() == outcome and same_failure(BATCH, record.result())


def test_the_case_file_carries_the_env_and_the_targets(tmp_path):
    case = Case("/m", {"dtype": "bfloat16"}, [Request([1, 2], 7, 0, 0), Request([3], 8, 1, 0)], 4, env=dict(ENV))
    path = CaseFile("smollm2", case, BATCH, "hunt trial x").write(tmp_path / "case.json")
    back = CaseFile.read(path)
    assert back.case == case and back.expected == BATCH and back.case.env == ENV
    assert "first 2 requests" in back.expected.describe() and "bitwise" in back.expected.describe()


def test_the_hunt_hands_a_batch_invariance_finding_over_with_its_engines_env():
    from rollout_lab.hunt.protocol import Finding, OracleVerdict, Signature, TrialResult
    from rollout_lab.hunt.repros import case_file
    from rollout_lab.hunt.triage import why_not_minimized

    engine = {"model": "smollm2", "engine.dtype": "bfloat16", "engine.enforce_eager": False,
              "env.VLLM_BATCH_INVARIANT": "1", "env.VLLM_USE_V2_MODEL_RUNNER": "1"}
    trial_case = Case("smollm2", {"dtype": "bfloat16", "enforce_eager": False}, [Request([1, 2], 7 + i, i, 0) for i in range(5)], 32)
    result = TrialResult("fail", dtype="bfloat16", case=trial_case, oracles={
        "reference": OracleVerdict(160), "batch_invariance": OracleVerdict(119, 3, 0.136, "any", None, 4, 1, True, 22)})
    signature = result.signature(engine)
    assert str(signature) == "mismatch/batch_invariance:smollm2:bfloat16:any"
    finding = Finding(signature, "0b64cc594bc4", 714.1, 7, 1, engine, {}, result)
    assert why_not_minimized(finding) is None
    handed = case_file(finding, {"bfloat16": 1.5}, None, {})
    assert handed.expected == Expected("batch_invariance", 0.0, targets=4)
    assert handed.case.env == ENV and handed.case.fault is None and len(handed.case.requests) == 5
    assert why_not_minimized(Finding(Signature("hang", phase="trial", model="smollm2"), "t", 0, 0, 1, engine, {}, result))


def test_the_reducer_keeps_a_batch_of_two_without_running_a_batch_of_one(tmp_path):
    from rich.console import Console

    from rollout_lab.minimize.knobs import knob_targets
    from rollout_lab.minimize.reduce import Reducer
    from rollout_lab.minimize.trials import Rule, TrialRunner

    runner = TrialRunner(Expected("batch_invariance", 0.0, targets=4), tmp_path / "log.jsonl", Rule(), Console())
    runs = []

    def outcome(case):
        runs.append(len(case.requests))
        # Any batch of two or more differs (run-to-run noise would make a batch of one "differ" too).
        return Outcome(num_requests=len(case.requests), targets=min(4, len(case.requests)), differing=[0]), 0.0

    runner._outcome = outcome
    case = Case("m", {"dtype": "float32"}, [Request([1, 2, 3, 4], 10 + i, i, 0) for i in range(6)], 8)
    reduced = Reducer(runner, knob_targets(on_gpu=False)).workload(case)
    assert len(reduced.requests) == 2 and reduced.max_tokens == 1
    assert 1 not in runs and min(runs) == 2


def spec(env=ENV, fault=None, model="smollm2") -> ReproSpec:
    requests = [Request(list(range(100, 165)), 7 + i, i, 0) for i in range(5)]
    case = Case("/cache/models/smollm2", {"dtype": "bfloat16", "enforce_eager": False, "max_num_seqs": 16}, requests, 32,
                fault=fault, fault_params={"min_batch": 3, "scale": 0.1, "seed": 0} if fault else {}, env=dict(env))
    return ReproSpec("[Bug]: a request changes with its batch (GPU)", "Two plain sentences.", model, case,
                     Expected("batch_invariance", 0.0, targets=4), [f"prompt {i}" for i in range(5)])


def test_the_emitted_source_sets_the_env_before_vllm_and_fits_its_budget():
    source = repro_source(spec())
    tree = ast.parse(source)
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert modules <= {"vllm", "torch", "transformers"} | set(sys.stdlib_module_names)
    assert budget_lines(source) <= LINE_BUDGET["batch_invariance"], budget_lines(source)
    for model in ("smollm2", "hybrid-tiny"):
        assert 30 <= budget_lines(repro_source(spec(fault="batch_threshold", model=model))) <= LINE_BUDGET["batch_invariance"]
    lines = source.splitlines()
    env_at = lines.index("os.environ.update(ENV)  # before vLLM is imported: it reads some of them at import")
    assert env_at < next(i for i, line in enumerate(lines) if "import torch, transformers, vllm" in line)
    namespace = {}
    exec(compile(source, "repro.py", "exec"), namespace)  # not __main__: nothing runs
    assert namespace["ENV"] == ENV and namespace["TARGETS"] == 4 and len(namespace["REQUESTS"]) == 5
    assert "ENV" not in repro_source(spec(env={}))


STUB_VLLM = '''
import os
__version__ = "stub"
calls = []


class SamplingParams:
    def __init__(self, seed=None, **kwargs):
        self.seed = seed


class Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


class Completion:
    def __init__(self, token_ids, logprobs):
        self.token_ids, self.logprobs = token_ids, [{{t: Logprob(lp)}} for t, lp in zip(token_ids, logprobs)]


class Output:
    def __init__(self, completion):
        self.outputs = [completion]


class LLM:
    def __init__(self, **kwargs):
        assert os.environ.get("VLLM_BATCH_INVARIANT") == "1", "ENV was not set before vllm was imported"

    def generate(self, prompts, params, use_tqdm=False):
        batch = len(prompts) > 1
        # Seed 8 (the second request) comes back {change} alone.
        return [Output(Completion([p.seed, 1], [-1.0, -2.0 - ({delta} if p.seed == 8 and not batch else 0.0)])) for p in params]

    def collective_rpc(self, method):
        return ["engine choices of the stub"]
'''


@pytest.mark.parametrize("change,delta,verdict,status", [
    ("with another logprob", 1e-7, "REPRODUCED: 1/4 target requests differ alone vs in the batch of 5, max |diff| 1e-07", 1),
    ("unchanged", 0.0, "NOT REPRODUCED: all 4 target requests bitwise identical alone and in the batch of 5", 0),
])
def test_the_emitted_repro_compares_each_target_alone_with_its_batch_output(tmp_path, change, delta, verdict, status):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(STUB_VLLM.format(change=change, delta=delta))
    script = tmp_path / "repro.py"
    script.write_text(repro_source(spec()))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{Path(np.__file__).parents[1]}"})
    verdicts = [line for line in done.stdout.splitlines() if line.split(":")[0] in ("REPRODUCED", "NOT REPRODUCED", "CANNOT RUN")]
    assert verdicts == [verdict] and done.returncode == status, done.stdout[-2000:] + done.stderr[-2000:]


def test_the_workload_goes_first_when_the_budget_holds_too_few_engine_starts_for_the_knobs(tmp_path):
    import time

    from rich.console import Console

    from rollout_lab.minimize.reduce import knobs_fit
    from rollout_lab.minimize.trials import Rule, TrialRunner

    runner = TrialRunner(BATCH, tmp_path / "log.jsonl", Rule(), Console(), deadline=time.time() + 100)
    runner.records = [TrialRecord(1, "k", 0, "calibrate", "original", {}, True, {}, 45.0, engine_start_seconds=40.0)]
    assert knobs_fit(runner, 1)  # all at once and the one knob: 2 starts of 40 s in 100 s
    assert not knobs_fit(runner, 2)
    assert knobs_fit(runner, 0)
    runner.deadline = None
    assert knobs_fit(runner, 10)


def batch_reduction(tmp_path, env=ENV):
    from rollout_lab.config import RunConfig
    from rollout_lab.minimize.predicate import FailingRun
    from rollout_lab.minimize.knobs import knob_targets
    from rollout_lab.minimize.reduce import Reduction, Size
    from rollout_lab.minimize.trials import Rule, case_key

    targets = knob_targets(on_gpu=True)
    big = Case("/m", {"dtype": "bfloat16", "max_num_seqs": 16}, [Request([1, 2, 3], 7 + i, i, 0) for i in range(5)], 32, env=dict(env))
    small = Case("/m", {"dtype": "bfloat16"}, [Request([3], 7, 0, i) for i in range(2)], 4, env=dict(env))
    expected = Expected("batch_invariance", 0.0, targets=4)
    outcome = asdict(batch_outcome([out([5, 6], [-0.5, -1.0]), out([8], [-0.1])], [out([5, 6], [-0.5, -1.5])]))
    records = [TrialRecord(1, case_key(small, expected), 0, "samples", "samples 5 -> 2", {}, True, outcome, 1.0)]
    run = FailingRun(tmp_path, "case", RunConfig(), 0, big, expected, "hunt trial 0b64cc594bc4")
    return Reduction(run, small, Rule(), Size.of(big, targets), Size.of(small, targets), targets, records)


def test_the_report_names_the_env_and_flips_each_switch_in_fresh_processes(tmp_path):
    from rollout_lab.minimize.emit import Emitter
    from rollout_lab.minimize.fresh import Verification
    from rollout_lab.minimize.report_text import description, title, where_it_fails

    red = batch_reduction(tmp_path)
    assert title(red, red.case, "GPU") == "[Bug]: VLLM_BATCH_INVARIANT=1 VLLM_USE_V2_MODEL_RUNNER=1: logprobs depend on the batch (GPU)"
    text = description(red, red.case)
    assert "2 request(s) on 1 prompt(s)" in text and "with VLLM_BATCH_INVARIANT=1 VLLM_USE_V2_MODEL_RUNNER=1" in text
    assert "1/1 targets differ alone vs in a batch of 2 (max |diff| 0.5)" in text
    assert where_it_fails(red, red.case)[0].startswith("- Minimal case: target requests [0] of the first 1 differ")
    emitter, tried = Emitter(red, tmp_path, None, "GPU"), []
    emitter.run = lambda case, args=(): tried.append(case.env) or Verification(list(args), 0, 1.0, "", "NOT REPRODUCED: clean")
    assert [f.describe() for f in emitter.flips(red.case)] == ["VLLM_BATCH_INVARIANT=0: clean 1/1", "VLLM_USE_V2_MODEL_RUNNER=0: clean 1/1"]
    # One variable flipped at a time, the other as the case has it.
    assert tried == [ENV | {"VLLM_BATCH_INVARIANT": "0"}, ENV | {"VLLM_USE_V2_MODEL_RUNNER": "0"}]


def test_a_hunt_dirs_failing_trial_becomes_a_case_file_by_its_key(tmp_path, capsys):
    from rollout_lab.hunt.protocol import OracleVerdict, TrialResult
    from rollout_lab.hunt.repros import main
    from rollout_lab.hunt.store import Store, TrialRow

    engine = {"model": "smollm2", "engine.dtype": "bfloat16", "env.VLLM_BATCH_INVARIANT": "1", "env.VLLM_USE_V2_MODEL_RUNNER": "1"}
    result = TrialResult("fail", dtype="bfloat16", case=Case("smollm2", {"dtype": "bfloat16"}, [Request([1], 7, 0, 0), Request([2], 8, 1, 0)], 32),
                         oracles={"batch_invariance": OracleVerdict(60, 2, 0.136, "any", None, 2, 0, True, 22)})
    hunt = tmp_path / "hunt"
    hunt.mkdir()
    Store(hunt / "hunt.db").add_trial(TrialRow("0b64cc594bc4", 3, engine, {"generator": "shared_prefix"}, "fail",
                                               result.signature(engine), result, 9.0, 714.1))
    assert main([str(hunt), "0b64cc594bc4"]) == 0
    handed = CaseFile.read(hunt / "findings" / "0b64cc594bc4" / "case.json")
    assert handed.expected == Expected("batch_invariance", 0.0, targets=2) and handed.case.env == ENV and handed.model == "smollm2"
    assert main([str(hunt), "nope"]) == 2
    assert "no failing trial 'nope'; failing trials: 0b64cc594bc4" in capsys.readouterr().err
