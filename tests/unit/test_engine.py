"""The engine layer's pure parts: vLLM's outputs as SampledOutput records, one per completion."""
from types import SimpleNamespace

import pytest

from rollout_lab import compat, engine


def output(request_id, prompt, completions, cached=None, metrics=None):
    """A RequestOutput as vLLM returns it: completions as (token ids, {position: {token: logprob}} or None)."""
    outs = [SimpleNamespace(token_ids=tokens, finish_reason="length", text="t",
                            logprobs=None if top is None else [{t: SimpleNamespace(logprob=lp) for t, lp in step.items()} for step in top])
            for tokens, top in completions]
    return SimpleNamespace(request_id=request_id, prompt_token_ids=prompt, outputs=outs, num_cached_tokens=cached, metrics=metrics)


def test_each_completion_is_one_record_with_its_sampled_tokens_logprob_and_the_top_k():
    top = [{5: -0.5, 9: -1.5}, {9: -0.25, 6: -2.0}, {7: -1.0}]
    first = output("3", [1, 2], [([5, 6, 7], top), ([8], [{8: -0.75}])], cached=16)
    second = output("t-4", [3], [([4], None)])
    records = engine.sampled_outputs([first, second])
    assert [(r.request, r.request_id, r.completion) for r in records] == [(0, "3", 0), (0, "3", 1), (1, "t-4", 0)]
    assert records[0].logprobs == [-0.5, -2.0, -1.0]  # the sampled token's, not the best one's
    assert records[0].top_logprobs[1] == {9: -0.25, 6: -2.0}
    assert (records[0].num_cached_tokens, records[0].prompt_token_ids, records[0].finish_reason) == (16, [1, 2], "length")
    # No logprobs asked for: none recorded; a missing cached count is vLLM's 0.
    assert (records[2].logprobs, records[2].top_logprobs, records[2].num_cached_tokens) == ([], [], 0)


@pytest.mark.parametrize("keeps", [True, False])
def test_an_unkept_preemption_count_is_unknown_never_zero(monkeypatch, keeps):
    monkeypatch.setattr(compat, "keeps_request_preemptions", lambda: keeps)
    counted = output("0", [1], [([5], [{5: -1.0}])], metrics=SimpleNamespace(num_preemptions=0))
    no_stats = output("1", [1], [([5], [{5: -1.0}])], metrics=None)
    records = engine.sampled_outputs([counted, no_stats])
    assert [r.num_preemptions for r in records] == ([0, None] if keeps else [None, None])


def test_sampling_params_take_the_seed_and_the_knobs_as_given():
    params = engine.sampling_params(7, n=1, max_tokens=4, temperature=1.0, top_p=0.9, top_k=-1, logprobs=0)
    assert (params.seed, params.max_tokens, params.top_p, params.logprobs) == (7, 4, 0.9, 0)
    assert engine.sampling_params(None, temperature=0.0, max_tokens=2).seed is None
    with pytest.raises(Exception) as refused:
        engine.sampling_params(None, temperature=0.0, n=2)  # greedy with n > 1: vLLM refuses it
    assert compat.is_rejection(refused.value)
