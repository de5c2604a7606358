"""Per-layer capture inside vLLM's worker, for the requested (request, position) pairs only.

    llm.collective_rpc(capture.install, args=(points, wanted))   # hooks on, before llm.generate
    llm.generate(...)
    llm.collective_rpc(capture.collect)                          # -> [CapturedToken]; hooks off

vLLM 0.32 (CPU) ships no per-request tensor dump, so this is forward hooks on the model's modules,
in eager mode (no torch.compile, no CUDA graphs). Each engine step the model runner flattens its
requests' tokens into one batch in `input_batch.req_ids` order, request j owning rows
query_start_loc[j]:query_start_loc[j+1] at positions num_computed_tokens[j] + 0, 1, ...; logits
are computed for each request's last row only, row j of compute_logits' input. A hook copies just
the wanted rows (fused kernels reuse and modify buffers in place), and only at their first
computation: a re-prefill after a preemption recomputes a position but samples nothing from it.
While capture is off nothing is installed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout_lab.instrument import engine_request_id
from rollout_lab.localize.divergence import Point


@dataclass
class CapturedToken:
    """The activations of one (request, input position) as vLLM computed them, copied to CPU float32."""

    request: int
    input_position: int
    # Point.module (the point's kind for the logits) -> the token's row.
    rows: dict[str, torch.Tensor]


def row_key(point: Point) -> str:
    """The key of a point's row in CapturedToken.rows (and in the reference's)."""
    return point.module or point.kind


class _Capture:
    """What the hooks share within one worker: the wanted tokens, this forward's rows, the copies."""

    def __init__(self, runner, wanted: list[tuple[int, int]]):
        self.runner = runner
        self.wanted = set(wanted)
        self.requests = {request for request, _ in wanted}
        self.captured: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.keys: list[tuple[int, int]] = []  # this forward's wanted tokens, in row order
        self.index = None  # their rows in the flattened batch
        self.logit_keys: list[tuple[int, int]] = []
        self.logit_index = None
        self.handles: list = []
        self.restore: list[tuple[object, str, object]] = []

    def locate(self) -> None:
        """Find this forward's wanted, not yet captured tokens in the flattened batch."""
        batch, runner = self.runner.input_batch, self.runner
        num_reqs = batch.num_reqs
        starts = runner.query_start_loc.np[: num_reqs + 1]
        rows, logit_rows, self.keys, self.logit_keys = [], [], [], []
        for j, internal_id in enumerate(batch.req_ids[:num_reqs]):
            output_id = engine_request_id(internal_id)
            if not output_id.isdigit() or int(output_id) not in self.requests:
                continue
            first, start, end = int(batch.num_computed_tokens_cpu[j]), int(starts[j]), int(starts[j + 1])
            for offset in range(end - start):
                key = (int(output_id), first + offset)
                if key in self.wanted and key not in self.captured:
                    rows.append(start + offset)
                    self.keys.append(key)
                    if offset == end - start - 1:
                        logit_rows.append(j)
                        self.logit_keys.append(key)
        for key in self.keys:
            self.captured[key] = {}
        device = self.runner.device
        self.index = torch.tensor(rows, dtype=torch.long, device=device) if rows else None
        self.logit_index = torch.tensor(logit_rows, dtype=torch.long, device=device) if logit_rows else None

    def keep(self, name: str, tensors: list[torch.Tensor], keys, index) -> None:
        """Copy the wanted rows of the sum of `tensors` (the residual stream may come in two parts)."""
        if index is None:
            return
        rows = sum(t.index_select(0, index) for t in tensors).float().cpu()
        for key, row in zip(keys, rows):
            self.captured[key][name] = row

    def wrap(self, owner, attribute: str, make) -> None:
        """Shadow owner.attribute with make(original) until collect() restores it."""
        self.restore.append((owner, attribute, vars(owner).get(attribute)))
        setattr(owner, attribute, make(getattr(owner, attribute)))


def _first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _check_runner(runner) -> None:
    """Raise, naming what is missing, where this model runner lacks what the capture reads."""
    batch = getattr(runner, "input_batch", None)
    missing = [name for name, ok in (
        ("model_runner.input_batch", batch is not None),
        ("input_batch.req_ids", batch is not None and hasattr(batch, "req_ids")),
        ("input_batch.num_computed_tokens_cpu", batch is not None and hasattr(batch, "num_computed_tokens_cpu")),
        ("model_runner.query_start_loc.np", hasattr(getattr(runner, "query_start_loc", None), "np")),
    ) if not ok]
    if missing:
        raise RuntimeError(f"localize's capture needs the v1 model runner's {', '.join(missing)}, which "
                           f"{type(runner).__name__} lacks; run with VLLM_USE_V2_MODEL_RUNNER=0")
    if not runner.model_config.enforce_eager:
        raise RuntimeError("localize's capture needs enforce_eager=True (hooks do not run inside CUDA graphs or torch.compile)")


def install(worker, points: list[Point], wanted: list[tuple[int, int]]) -> int:
    """Hook `points` of the worker's model for the (request index, input position) pairs `wanted`; returns the hook count."""
    runner = worker.model_runner
    _check_runner(runner)
    model = runner.model
    modules = dict(model.named_modules())
    state = _Capture(runner, wanted)
    state.handles.append(model.register_forward_pre_hook(lambda module, args: state.locate()))
    layers = sorted({p.layer for p in points if p.layer is not None})
    for point in points:
        name = row_key(point)
        if point.kind == "logits":
            def logits_wrapper(compute_logits, name=name):
                def compute(*args, **kwargs):
                    logits = compute_logits(*args, **kwargs)
                    if logits is not None:
                        state.keep(name, [logits], state.logit_keys, state.logit_index)
                    return logits
                return compute
            state.wrap(model, "compute_logits", logits_wrapper)
            continue
        if point.kind == "residual":
            # vLLM fuses the residual add into the next norm (Llama: norm(hidden, residual)); the
            # stream is what that norm receives, summed.
            target = f"model.layers.{point.layer + 1}.input_layernorm" if point.layer != layers[-1] else "model.norm"
        else:
            target = point.module
        if target not in modules:
            raise RuntimeError(f"vLLM's {type(model).__name__} has no module {target} (capture point {point.label()})")
        if point.kind == "residual":
            def pre_hook(module, args, kwargs, name=name):
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                state.keep(name, tensors, state.keys, state.index)
            state.handles.append(modules[target].register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def hook(module, args, output, name=name):
                state.keep(name, [_first_tensor(output)], state.keys, state.index)
            state.handles.append(modules[target].register_forward_hook(hook))
    worker.localize_capture = state
    return len(state.handles) + len(state.restore)


def collect(worker) -> list[CapturedToken]:
    """Remove every hook and wrapper install() added; return what was captured."""
    state = worker.localize_capture
    for handle in state.handles:
        handle.remove()
    for owner, attribute, previous in reversed(state.restore):
        if previous is None:
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, previous)
    del worker.localize_capture
    return [CapturedToken(request, position, rows) for (request, position), rows in sorted(state.captured.items())]
