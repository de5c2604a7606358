"""Candidate construction and the knob table, checked by hand."""
import pytest

from rollout_lab.minimize.knobs import case_knobs, deviating_knobs, knob_targets, with_case_knobs, with_knobs
from rollout_lab.minimize.reduce import (
    Size,
    prompt_indices,
    with_merged_prompts,
    with_one_prompt,
    with_prompt_len,
    with_prompts,
    with_samples,
)
from rollout_lab.minimize.standalone import Case, Request

KV_TIGHT = {
    "dtype": "float32",
    "seed": 0,
    "max_model_len": 256,
    "max_num_seqs": 32,
    "enable_prefix_caching": True,
    "enable_chunked_prefill": True,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 24_000_000,
    "max_num_batched_tokens": 512,
    "block_size": 32,
}


def test_on_cpu_the_cache_size_and_eager_mode_stand_in_for_vllm_defaults():
    cpu, gpu = knob_targets(on_gpu=False), knob_targets(on_gpu=True)
    assert cpu["cache_size"] == {"gpu_memory_utilization": 0.3}
    assert cpu["enforce_eager"] == {"enforce_eager": True}
    assert gpu["cache_size"] == {} and gpu["enforce_eager"] == {}
    assert all(cpu[k] == {} for k in cpu if k not in ("cache_size", "enforce_eager"))


def test_every_set_knob_that_is_not_its_target_deviates():
    targets = knob_targets(on_gpu=False)
    assert deviating_knobs(KV_TIGHT, targets) == [
        "cache_size",
        "block_size",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
        "enable_prefix_caching",
        "enable_chunked_prefill",
    ]
    assert deviating_knobs({"dtype": "float32", "gpu_memory_utilization": 0.3, "enforce_eager": True}, targets) == []


def test_knobs_outside_keep_go_back_and_other_arguments_stay():
    targets = knob_targets(on_gpu=False)
    args = with_knobs(KV_TIGHT, ["cache_size", "block_size"], targets)
    assert args == {
        "dtype": "float32",
        "seed": 0,
        "enforce_eager": True,
        "kv_cache_memory_bytes": 24_000_000,
        "block_size": 32,
    }
    assert with_knobs(KV_TIGHT, [], targets) == {"dtype": "float32", "seed": 0, "gpu_memory_utilization": 0.3, "enforce_eager": True}
    assert with_knobs(KV_TIGHT, [], knob_targets(on_gpu=True)) == {"dtype": "float32", "seed": 0}


PROMPTS = {4: [1, 2, 3], 5: [4, 5, 6, 7], 6: [8, 9]}


def _case() -> Case:
    requests = [Request(ids, seed=100 * p + s, prompt_index=p, sample_index=s) for p, ids in PROMPTS.items() for s in range(3)]
    return Case(model="m", engine_args=dict(KV_TIGHT), requests=requests, max_tokens=32)


def test_workload_candidates_keep_request_order_and_seeds():
    case = _case()
    assert prompt_indices(case) == [4, 5, 6]
    two = with_prompts(case, [6, 4])
    assert [(r.prompt_index, r.sample_index, r.seed) for r in two.requests] == [(4, 0, 400), (4, 1, 401), (4, 2, 402), (6, 0, 600), (6, 1, 601), (6, 2, 602)]
    one_sample = with_samples(two, 1)
    assert [(r.prompt_index, r.seed) for r in one_sample.requests] == [(4, 400), (6, 600)]
    # Prompts keep their last tokens: the end of the chat turn.
    assert [r.prompt_token_ids for r in with_prompt_len(case, 2).requests[::3]] == [[2, 3], [6, 7], [8, 9]]
    assert case.requests[0].prompt_token_ids == [1, 2, 3]


def test_size_counts_what_the_reduction_shrinks():
    size = Size.of(with_samples(with_prompts(_case(), [5]), 2), knob_targets(on_gpu=False))
    assert (size.prompts, size.samples_per_prompt, size.requests, size.max_tokens, size.prompt_tokens) == (1, 2, 2, 32, 4)
    assert "1 prompts x 2 samples (2 requests)" in size.describe()



def test_one_prompt_carries_every_request_with_its_own_seed():
    one = with_one_prompt(with_prompts(_case(), [5, 6]))
    assert [(r.prompt_token_ids, r.prompt_index, r.sample_index, r.seed) for r in one.requests] == [
        ([4, 5, 6, 7], 5, 0, 500), ([4, 5, 6, 7], 5, 1, 501), ([4, 5, 6, 7], 5, 2, 502),
        ([4, 5, 6, 7], 5, 3, 600), ([4, 5, 6, 7], 5, 4, 601), ([4, 5, 6, 7], 5, 5, 602),
    ]
    assert Size.of(one, knob_targets(on_gpu=False)).samples_per_prompt == 6


def test_calibration_stops_after_one_run_once_the_budget_is_spent(tmp_path):
    from rich.console import Console

    from rollout_lab.minimize.reduce import Reducer
    from rollout_lab.minimize.standalone import Expected, Outcome
    from rollout_lab.minimize.trials import Rule, TrialRunner

    runner = TrialRunner(Expected("crash", 1e-3, crash_key="E@vllm/a.py:f"), tmp_path / "log.jsonl", Rule(), Console())
    runner._outcome = lambda case: (Outcome(crash_key="E@vllm/a.py:f"), 0.0)
    reducer = Reducer(runner, knob_targets(on_gpu=False))
    original = Case("m", dict(KV_TIGHT), [Request([1, 2, 3], 0)], 4)
    assert reducer.calibrate(original, 3) == (3, 3)
    runner.cache.clear()
    runner.deadline = 1.0  # spent: one run still decides whether the case fails at all
    assert reducer.calibrate(original, 3) == (1, 1)


def test_merged_prompts_concatenate_consecutive_prompts_and_keep_the_first_ones_requests():
    case = _case()
    two = with_merged_prompts(case, 2)
    assert [(r.prompt_token_ids, r.prompt_index, r.seed) for r in two.requests] == [
        ([1, 2, 3], 4, 400), ([1, 2, 3], 4, 401), ([1, 2, 3], 4, 402),
        ([4, 5, 6, 7, 8, 9], 5, 500), ([4, 5, 6, 7, 8, 9], 5, 501), ([4, 5, 6, 7, 8, 9], 5, 502),
    ]
    one = with_merged_prompts(case, 1)
    assert {tuple(r.prompt_token_ids) for r in one.requests} == {tuple(range(1, 10))}
    assert len(one.requests) == 3
    # No room past max_model_len - max_tokens: the concatenation keeps its last tokens.
    short = Case("m", dict(KV_TIGHT, max_model_len=36), case.requests, max_tokens=32)
    assert with_merged_prompts(short, 1).requests[0].prompt_token_ids == [6, 7, 8, 9]


def test_a_failure_that_needs_many_cached_tokens_reduces_to_one_prompt(tmp_path):
    """index_overflow's shape: it fails once the requests' prompts hold enough tokens, whatever the prompts."""
    from rich.console import Console

    from rollout_lab.minimize.reduce import Reducer
    from rollout_lab.minimize.standalone import Expected, Outcome
    from rollout_lab.minimize.trials import Rule, TrialRunner

    runner = TrialRunner(Expected("crash", 1e-3, crash_key="E@vllm/a.py:f"), tmp_path / "log.jsonl", Rule(), Console())

    def outcome(case):
        held = sum(len(r.prompt_token_ids) for r in case.requests if r.sample_index == 0)
        return (Outcome(crash_key="E@vllm/a.py:f") if held >= 8 else Outcome()), 0.0

    runner._outcome = outcome
    reduced = Reducer(runner, knob_targets(on_gpu=False)).workload(_case())
    # No single original prompt holds 8 tokens: ddmin alone would keep all three.
    assert len(prompt_indices(reduced)) == 1
    assert [len(r.prompt_token_ids) for r in reduced.requests] == [8]


def _reducer(tmp_path, fails):
    """A Reducer on a TrialRunner whose runs crash when fails(case) (no engine)."""
    from rich.console import Console

    from rollout_lab.minimize.reduce import Reducer
    from rollout_lab.minimize.standalone import Expected, Outcome
    from rollout_lab.minimize.trials import Rule, TrialRunner

    runner = TrialRunner(Expected("crash", 1e-3, crash_key="E@vllm/a.py:f"), tmp_path / "log.jsonl", Rule(), Console())
    runner._outcome = lambda case: (Outcome(crash_key="E@vllm/a.py:f") if fails(case) else Outcome(), 0.0)
    return Reducer(runner, knob_targets(on_gpu=False)), runner


def test_a_failure_that_needs_many_requests_goes_to_one_prompt_before_ddmin(tmp_path):
    reducer, runner = _reducer(tmp_path, lambda case: len(case.requests) >= 7)
    reduced = reducer.workload(_case())
    assert len(prompt_indices(reduced)) == 1 and len(reduced.requests) == 7
    # Merged into one, into two, then all 9 requests on one prompt: no ddmin over the prompts.
    assert [r.change for r in runner.records if r.stage == "prompts"] == [
        "prompts 3 -> 1, concatenated", "prompts 3 -> 2, concatenated", "all 9 requests on prompt 4"]


def test_knobs_sweep_until_each_kept_knob_is_needed_beside_the_others(tmp_path):
    targets = knob_targets(on_gpu=False)

    def fails(case):
        # block_size is the trigger; max_num_seqs=32 hides it unless the small cache stays too.
        knobs = deviating_knobs(case.engine_args, targets)
        return "block_size" in knobs and ("cache_size" in knobs or "max_num_seqs" not in knobs)

    reducer, runner = _reducer(tmp_path, fails)
    reduced = reducer.knobs(Case("m", dict(KV_TIGHT), [Request([1, 2, 3], 0)], 4))
    assert deviating_knobs(reduced.engine_args, targets) == ["block_size"]
    # All at once, each of the 7 knobs once, then cache_size again beside block_size alone.
    assert runner.new_trials == 9
    assert not next(r for r in runner.records if r.size["knobs"] == []).failed


HIGH_IDS = {"dtype": "float32", "block_size": 32, "kv_cache_memory_bytes": 330_000_000, "max_model_len": 256,
            "max_num_seqs": 16, "enforce_eager": True}


def test_the_block_pool_head_is_a_knob_of_the_case_that_goes_back_to_none():
    targets = knob_targets(on_gpu=False)
    case = Case("m", HIGH_IDS, [Request([1, 2, 3], 0)], 4, block_pool_head=0.8)
    assert case_knobs(case, targets) == ["cache_size", "block_size", "max_num_seqs", "max_model_len", "block_pool_head"]
    assert Size.of(case, targets).knobs[-1] == "block_pool_head"
    kept = with_case_knobs(case, ["block_size", "block_pool_head"], targets)
    assert (kept.block_pool_head, kept.engine_args) == (0.8, {"dtype": "float32", "block_size": 32, "enforce_eager": True,
                                                              "gpu_memory_utilization": 0.3})
    assert with_case_knobs(case, ["block_size"], targets).block_pool_head is None


def test_the_reducer_keeps_the_head_only_when_the_failure_needs_it(tmp_path):
    targets = knob_targets(on_gpu=False)
    case = Case("m", HIGH_IDS, [Request([1, 2, 3], 0)], 4, block_pool_head=0.8)
    # An overflow past a high block id: on the default (big) cache too, but only with the head moved.
    reducer, runner = _reducer(tmp_path / "needs", lambda c: c.block_pool_head is not None)
    reduced = reducer.knobs(case)
    assert case_knobs(reduced, targets) == ["block_pool_head"] and reduced.block_pool_head == 0.8
    # All at once (the head too) passed; each engine knob went back alone with the head kept.
    assert [r.failed for r in runner.records] == [False, True, True, True, True]
    # A failure the head does not matter to: it goes back with the other knobs.
    reducer, _ = _reducer(tmp_path / "indifferent", lambda c: "block_size" in deviating_knobs(c.engine_args, targets))
    reduced = reducer.knobs(case)
    assert case_knobs(reduced, targets) == ["block_size"] and reduced.block_pool_head is None


def _mismatch_run(tmp_path, origin: str, hinted: str, observed, flagged: int):
    """A FailingRun of a silent mismatch of class `hinted`, and a TrialRunner whose replays flag
    `flagged` tokens on `observed` requests (no engine)."""
    from rich.console import Console

    from rollout_lab.config import RunConfig
    from rollout_lab.minimize.predicate import FailingRun
    from rollout_lab.minimize.standalone import Expected, Outcome
    from rollout_lab.minimize.trials import Rule, TrialRunner

    case = Case("m", {"dtype": "float32"}, [Request([1, 2, 3], 0, p, 0) for p in range(4)], 8)
    expected = Expected("mismatch", 1e-3, request_class=hinted)
    run = FailingRun(tmp_path / "finding", "f00", RunConfig(), 0, case, expected, "hunt trial 3: mismatch", origin=origin)
    runner = TrialRunner(expected, tmp_path / "log.jsonl", Rule(), Console())
    runner._outcome = lambda c: (Outcome(num_requests=len(c.requests), num_tokens=32, num_flagged=flagged,
                                         max_abs_diff=0.25 if flagged else 2e-5, request_class=observed), 0.0)
    return run, runner


def test_a_replay_that_reproduces_on_another_request_class_is_minimized_with_the_class_observed(tmp_path):
    from rich.console import Console

    from rollout_lab.minimize.reduce import minimize

    run, runner = _mismatch_run(tmp_path, "hunt trial", "prefix_cached", "any", 24)
    reduction = minimize(run, runner, knob_targets(on_gpu=False), 3, None, Console())
    assert reduction.run.expected.request_class == "any" and runner.expected.request_class == "any"
    assert reduction.class_note == ("the hunt trial's flagged requests were 'prefix_cached'; its replay flagged 'any' ones, "
                                    "so the case is minimized with class 'any'")
    assert len(reduction.case.requests) == 1


def test_did_not_reproduce_says_what_the_replays_showed_and_a_cause_that_fits_the_origin(tmp_path):
    from rich.console import Console

    from rollout_lab.minimize.reduce import minimize

    for origin, cause, absent in (("hunt trial", "a hunt trial has no RL updates", "it may need the RL updates"),
                                  ("RL run", "it may need the RL updates, the trainer", "hunt trial")):
        run, runner = _mismatch_run(tmp_path / origin.replace(" ", "_"), origin, "preempted", None, 0)
        with pytest.raises(ValueError) as raised:
            minimize(run, runner, knob_targets(on_gpu=False), 2, None, Console())
        message = str(raised.value)
        assert "did not reproduce in 2 runs" in message and "the replays showed 0/32 tokens flagged, max diff 2e-05" in message
        assert cause in message and absent not in message, message
