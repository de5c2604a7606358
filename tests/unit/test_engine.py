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


@pytest.mark.parametrize("module, label", [
    ("vllm.v1.worker.gpu_model_runner", "v1"),  # CUDA 0.25's default for most models
    ("vllm.v1.worker.gpu.model_runner", "v2"),  # VLLM_USE_V2_MODEL_RUNNER=1
    ("vllm.v1.worker.cpu_model_runner", "cpu"),
    ("vllm.v1.worker.cpu.model_runner", "cpu-v2"),
    ("vllm.v1.worker.xpu_model_runner", None),
    ("vllm.v1.worker.gpu", None),
])
def test_the_runner_label_comes_from_the_runner_class_module(module, label):
    assert engine.runner_label(module) == label


def test_every_labelled_runner_module_is_a_model_runner_of_the_installed_vllm():
    import importlib.util
    from pathlib import Path

    root = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]).parent
    for module in engine.RUNNER_LABELS:
        source = (root / (module.replace(".", "/") + ".py")).read_text()
        assert "ModelRunner(" in source, module


def fake_llm(module, attn_groups):
    """An LLM whose rank-0 worker holds a runner of class `module`.Runner (no attn_groups when None)."""
    runner_class = type("Runner", (), {"__module__": module})
    runner = runner_class()
    if attn_groups is not None:
        runner.attn_groups = [[SimpleNamespace(backend=SimpleNamespace(get_name=lambda n=name: n)) for name in group]
                              for group in attn_groups]
    worker = SimpleNamespace(model_runner=runner)
    return SimpleNamespace(collective_rpc=lambda fn: [fn(worker), fn(worker)])


def test_execution_facts_name_the_runner_and_each_kv_cache_groups_backends_once():
    llm = fake_llm("vllm.v1.worker.gpu.model_runner", [["FLASH_ATTN", "FLASH_ATTN"], ["MAMBA2_ATTN"]])
    assert engine.execution_facts(llm) == engine.ExecutionFacts(
        "vllm.v1.worker.gpu.model_runner.Runner", "v2", [["FLASH_ATTN"], ["MAMBA2_ATTN"]])


def test_a_runner_without_attention_groups_records_none_not_a_failure():
    facts = engine.execution_facts(fake_llm("vllm.v1.worker.xpu_model_runner", None))
    assert (facts.model_runner_label, facts.attention_backends) == (None, None)
