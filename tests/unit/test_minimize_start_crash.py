"""An engine that crashes while it starts: the hunt's case for it, its reduction over engine knobs
alone (a fake engine start, no vLLM), and the error line the hunt reports when a minimization fails."""
from rich.console import Console

from rollout_lab.crash import CrashSignature
from rollout_lab.hunt.protocol import Finding, Signature, TrialResult
from rollout_lab.hunt.repros import case_file, minimizer_error
from rollout_lab.minimize.predicate import FailingRun
from rollout_lab.minimize.knobs import deviating_knobs, knob_targets
from rollout_lab.minimize.reduce import minimize
from rollout_lab.minimize.standalone import Outcome
from rollout_lab.minimize.trials import Rule, TrialRunner

KEY = "IndexError@vllm/v1/worker/gpu_model_runner.py:_dummy_run|vllm/v1/worker/gpu_model_runner.py:profile_run"
ENGINE = {"model": "hybrid-tiny", "engine.dtype": "float32", "engine.block_size": 32, "engine.max_model_len": 512,
          "engine.max_num_seqs": 4, "engine.enable_prefix_caching": True, "engine.kv_cache_memory_bytes": 64_000_000,
          "engine.enforce_eager": True}


def start_crash_finding() -> Finding:
    # As supervise.py records an engine whose start raised: a trial of phase engine_start, no workload.
    crash = CrashSignature("IndexError", "index 4 is out of bounds", CrashSignature.parse(KEY).vllm_frames, phase="engine_start")
    result = TrialResult("crash", crash=crash, phase="engine_start")
    return Finding(Signature("crash", crash_key=KEY), "g0-start", 5.0, 1, 1, ENGINE, {}, result)


def test_the_hunt_hands_an_engine_start_crash_over_as_one():
    case = case_file(start_crash_finding(), {"float32": 1e-3}, None, {})
    assert case.expected.kind == "crash" and case.expected.at_start and case.expected.crash_key == KEY
    # The stand-in request is a real first sample of a first prompt (the hunt once gave it -1: 0 samples per prompt).
    [request] = case.case.requests
    assert (request.prompt_index, request.sample_index) == (0, 0)


def test_an_engine_start_crash_minimizes_over_the_engine_knobs_only(tmp_path):
    cf = case_file(start_crash_finding(), {"float32": 1e-3}, None, {})
    run = FailingRun(tmp_path, "start", None, 0, cf.case, cf.expected, cf.description)
    targets = knob_targets(on_gpu=False)
    runner = TrialRunner(cf.expected, tmp_path / "reduction.jsonl", Rule(), Console())
    started = []

    def outcome(case):
        # The fake start: it crashes whenever prefix caching is on with a block size of 32 set.
        started.append(case)
        knobs = deviating_knobs(case.engine_args, targets)
        if "enable_prefix_caching" in knobs and "block_size" in knobs:
            return Outcome(crash_key=KEY, crash_message="index 4 is out of bounds", at_start=True), 1.0
        return Outcome(num_requests=1), 1.0

    runner._outcome = outcome
    reduction = minimize(run, runner, targets, calibration_runs=1, rule=None, console=Console())
    assert reduction.after.knobs == ["block_size", "enable_prefix_caching"]
    assert {r.stage for r in reduction.records} == {"calibrate", "knobs"}  # no workload pass
    assert reduction.case.requests == cf.case.requests and reduction.case.max_tokens == cf.case.max_tokens


def test_a_crash_with_the_key_after_the_start_is_not_the_start_crash(tmp_path):
    from rollout_lab.minimize.standalone import same_failure

    expected = case_file(start_crash_finding(), {"float32": 1e-3}, None, {}).expected
    assert same_failure(expected, Outcome(crash_key=KEY, at_start=True))
    assert not same_failure(expected, Outcome(crash_key=KEY))


def test_the_hunt_reports_the_minimizers_error_not_the_last_log_line():
    log = ("minimizing findings/f00/case.json\n"
           "rollout_lab.minimize: the failure of findings/f00 did not reproduce in 3 runs\n"
           "[W1207 09:00:00 ProcessGroupNCCL.cpp:1250] Warning: WARNING: process group has NOT been destroyed\n")
    assert minimizer_error(log, 2) == "the failure of findings/f00 did not reproduce in 3 runs"
    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
             "ValueError: low=1 is above high=0\n[rank0]: NCCL warning\n")
    assert minimizer_error(trace, 1) == "ValueError: low=1 is above high=0"
    assert minimizer_error("some warning\n", -9) == "minimizer exit -9, no error line in its log"
