"""compat.py against the installed vLLM: each answer checked with what that release really does."""
import json
from types import SimpleNamespace

import pytest
import vllm
from packaging.version import Version
from vllm import SamplingParams
from vllm.v1.metrics.reader import Counter, Gauge, Histogram

from rollout_lab import compat


def test_greedy_sampling_with_two_samples_is_a_rejection():
    # The default hunt space reaches this: vLLM 0.25-0.26 raise VLLMValidationError (a ValueError),
    # 0.27 on a VLLMClientError that is not one; both must read as vLLM refusing the request.
    with pytest.raises(Exception) as refused:
        SamplingParams(temperature=0.0, n=2)
    assert "greedy" in str(refused.value)
    assert compat.is_rejection(refused.value)


def test_a_failure_while_running_is_not_a_rejection():
    assert not compat.is_rejection(RuntimeError("CPU Generator does not use offset"))
    assert not compat.is_rejection(IndexError("index 16 is out of bounds"))


def test_an_unsupported_mode_refused_at_start_is_a_rejection(monkeypatch):
    # The GPU hunt's false finding: vLLM's attention selector refuses batch-invariant mode for a
    # Mamba2 backend with a bare RuntimeError while the engine starts. Raised here by vLLM itself.
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

    monkeypatch.setattr(selector.envs, "VLLM_BATCH_INVARIANT", True)
    with pytest.raises(RuntimeError, match="batch_invariant mode is not supported") as refused:
        selector._cached_get_mamba_attn_backend.__wrapped__(MambaAttentionBackendEnum.MAMBA2)
    assert compat.is_rejection(refused.value)
    assert compat.is_rejection(NotImplementedError("FlexAttention does not support kv sharing yet."))
    assert compat.is_rejection(NotImplementedError("FP8 KV cache on CPU requires x86 with AVX-512 or AMX."))


def test_a_real_crash_at_start_is_no_rejection():
    # A model runner failing while it starts (profiling run, KV cache init) is a bug, even when its
    # message says "not supported" from the device, or comes as a subclass of RuntimeError.
    assert not compat.is_rejection(IndexError("index 4 is out of bounds for dimension 0 with size 4"))
    assert not compat.is_rejection(AssertionError("num_blocks must be positive"))
    assert not compat.is_rejection(RuntimeError("CUDA error: operation not supported"))
    assert not compat.is_rejection(NotImplementedError())  # a method vLLM left abstract
    assert not compat.is_rejection(NotImplementedError("Could not run 'aten::_fused_op' with arguments from the 'CPU' backend."))

    class KernelError(RuntimeError):
        pass

    assert not compat.is_rejection(KernelError("dtype not supported by this kernel"))


def test_per_request_preemption_count_is_unknown_where_vllm_keeps_none():
    # RequestStateStats.num_preemptions arrived in vLLM 0.30 (read in each release's source).
    keeps = Version(Version(vllm.__version__).base_version) >= Version("0.30")
    assert compat.keeps_request_preemptions() is keeps
    from vllm.v1.metrics.stats import RequestStateStats

    stats = RequestStateStats()
    if keeps:
        stats.num_preemptions = 2
    assert compat.preemptions_of(SimpleNamespace(metrics=stats)) == (2 if keeps else None)
    assert compat.preemptions_of(SimpleNamespace(metrics=None)) is None


def test_unknown_preemptions_do_not_count_as_preempted():
    assert [compat.was_preempted(n) for n in (None, 0, 1, 3)] == [False, False, True, True]


def test_engine_metrics_maps_counters_and_gauges_and_leaves_out_what_vllm_lacks():
    metrics = [
        Counter(name="vllm:num_preemptions", labels={"engine": "0"}, value=3),
        Counter(name="vllm:num_preemptions", labels={"engine": "1"}, value=2),
        Gauge(name="vllm:kv_cache_usage_perc", labels={}, value=0.25),
        Histogram(name="vllm:prompt_tokens", labels={}, count=1, sum=5.0, buckets={}),
        Counter(name="vllm:something_else", labels={}, value=7),
    ]
    values = compat.engine_metrics(SimpleNamespace(get_metrics=lambda: metrics))
    assert values == {"preemptions": 5.0, "kv_cache_usage": 0.25}


def test_the_installed_model_runner_reloads_weights_in_place():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert compat._reload_takes_iterator(GPUModelRunner)


def test_a_runner_without_in_place_reload_is_refused_with_the_release_named():
    class OldRunner:
        def reload_weights(self):
            pass

    with pytest.raises(RuntimeError, match=f"vLLM {vllm.__version__}.*OldRunner.reload_weights"):
        compat.reload_weights(OldRunner(), iter([]))


def test_hf_overrides_renames_hybrid_layers_for_a_vllm_that_reads_the_old_names(tmp_path, monkeypatch):
    config = {"model_type": "granitemoehybrid", "layer_types": ["linear_attention", "full_attention"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(compat, "_hybrid_layer_names", lambda: frozenset({"mamba", "attention"}))
    assert compat.hf_overrides(str(tmp_path)) == {"layer_types": ["mamba", "attention"]}
    monkeypatch.setattr(compat, "_hybrid_layer_names", lambda: frozenset({"linear_attention", "full_attention"}))
    assert compat.hf_overrides(str(tmp_path)) == {}


def test_hf_overrides_leaves_other_models_and_hub_ids_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert compat.hf_overrides(str(tmp_path)) == {}
    assert compat.hf_overrides("HuggingFaceTB/SmolLM2-135M-Instruct") == {}
