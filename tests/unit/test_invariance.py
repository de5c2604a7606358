"""Bitwise comparison of one request's outputs across batches and runs (invariance.py)."""
from rollout_lab.invariance import Comparison, Output, SettingResult, compare, summarize, verdict


def out(tokens, logprobs, top=None):
    return Output(tokens, logprobs, top or [{t: lp} for t, lp in zip(tokens, logprobs)])


def test_identical_outputs_compare_equal_everywhere():
    a = out([5, 6, 7], [-0.1, -0.2, -0.3])
    c = compare(a, out([5, 6, 7], [-0.1, -0.2, -0.3]), "batch of 8", "greedy", 0)
    assert c.identical and (c.compared, c.equal, c.max_abs_diff, c.first_token_diff) == (3, 3, 0.0, None)


def test_a_last_bit_difference_is_not_equal():
    a = out([5, 6], [-0.1, -0.2])
    b = out([5, 6], [-0.1, -0.2 + 2**-40])
    c = compare(a, b, "batch of 8", "greedy", 0)
    assert not c.identical and c.equal == 1 and 0 < c.max_abs_diff < 1e-11 and c.first_token_diff is None
    assert not c.top_equal  # the top-k holds the sampled token's logprob too


def test_comparison_stops_at_the_first_differing_token():
    # Position 1 differs: its sampled logprobs belong to different tokens, so only its top-k counts;
    # position 2 follows a different prefix and is not compared at all.
    a = out([5, 6, 7], [-0.1, -0.5, -0.3], [{5: -0.1}, {6: -0.5, 9: -1.0}, {7: -0.3}])
    b = out([5, 9, 1], [-0.1, -0.9, -4.0], [{5: -0.1}, {6: -0.5, 9: -1.0}, {1: -4.0}])
    c = compare(a, b, "batch of 8", "seeded", 2)
    assert (c.compared, c.equal, c.max_abs_diff, c.first_token_diff, c.top_equal) == (2, 1, 0.0, 1, True)


def test_a_shorter_output_differs_where_it_stops():
    c = compare(out([5, 6, 7], [-1.0, -1.0, -1.0]), out([5, 6], [-1.0, -1.0]), "x", "greedy", 0)
    assert c.first_token_diff == 2 and not c.identical


def test_summary_rows_and_the_verdict():
    comparisons = [
        Comparison("batch of 8", "greedy", 0, 4, 4, 0.0, None, True),
        Comparison("batch of 8", "greedy", 1, 4, 2, 3e-6, None, False),
        Comparison("fresh engine", "greedy", 0, 4, 4, 0.0, None, True),
    ]
    rows = summarize(True, comparisons)
    assert [(r.condition, r.targets, r.identical, r.bitwise_equal_share, r.max_abs_diff) for r in rows] == [
        ("batch of 8", 2, 1, 0.75, 3e-6), ("fresh engine", 1, 1, 1.0, 0.0)]
    promised = SettingResult(True, True, "cuda", "0.25.0", rows, 100.0, 1.0)
    assert promised.broken and verdict([promised]).startswith("BROKEN")
    floor = SettingResult(False, False, "cpu", "0.32.0", rows, 100.0, 1.0)
    assert not floor.broken and "noise floor elsewhere: max |diff| 3e-06" in verdict([floor])
    failed = SettingResult(True, False, "", "", [], 0.0, 0.0, "TypeError@x: no")
    assert verdict([failed]).startswith("CANNOT RUN")


class _Completion:
    def __init__(self, tokens, logprobs):
        from types import SimpleNamespace

        self.token_ids = tokens
        self.logprobs = [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(tokens, logprobs)]
        self.finish_reason, self.text = "length", ""


class _AloneEngine:
    """Answers each request run alone with canned tokens and logprobs (keyed by its first prompt id)."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace

        self.calls += 1
        return [SimpleNamespace(request_id=str(i), prompt_token_ids=p["prompt_token_ids"], num_cached_tokens=0, metrics=None,
                                outputs=[_Completion(*self.answers[p["prompt_token_ids"][0]])]) for i, p in enumerate(prompts)]


def test_the_hunt_oracle_reruns_only_reproducible_requests_and_flags_only_where_promised():
    from types import SimpleNamespace

    from rollout_lab.hunt.batch_oracle import batch_oracle

    greedy, seeded = SimpleNamespace(n=1, temperature=0.0, seed=None), SimpleNamespace(n=1, temperature=1.0, seed=7)
    unseeded, pair = SimpleNamespace(n=1, temperature=1.0, seed=None), SimpleNamespace(n=2, temperature=0.0, seed=None)
    sampled = [([1], greedy, out([5, 6], [-0.5, -0.25])), ([2], seeded, out([7], [-1.0])),
               ([3], unseeded, out([8], [-2.0])), ([4], pair, out([9], [-3.0]))]
    engine = _AloneEngine({1: ([5, 6], [-0.5, -0.25 + 2**-30]), 2: ([7], [-1.0])})
    floor = batch_oracle(engine, sampled, promised=False)
    assert engine.calls == 2  # neither the unseeded sample nor n=2 can be replayed alone
    assert (floor.requests, floor.identical, floor.flagged, floor.request_class) == (2, 1, 0, None)
    assert 0 < floor.max_diff < 1e-8
    promised = batch_oracle(_AloneEngine({1: ([5, 6], [-0.5, -0.25 + 2**-30]), 2: ([7], [-1.0])}), sampled, promised=True)
    assert (promised.flagged, promised.request_class) == (1, "any")


def test_a_setting_whose_process_dies_without_a_result_is_a_crash_not_a_hang():
    """Defect: run_setting waited on the child's queue with no timeout: a child killed by the OOM
    killer or a segfault (here: SIGABRT) left the command hanging forever."""
    import multiprocessing
    import os

    from rollout_lab.invariance import child_result

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=os.abort)
    process.start()
    result = child_result(process, queue, True)
    assert result.batch_invariant and not result.rows and not result.broken
    assert result.error == "the measuring process died without a result: killed by SIGABRT"
