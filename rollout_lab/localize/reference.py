"""The same capture points on the transformers float32 model (the trainer's side), teacher forcing.

Each request's sequence (prompt + vLLM's completion) runs alone through the model once, as long as
its last wanted position needs; forward hooks keep the wanted rows of each point's module output
(a decoder layer's output is the residual stream), the logits come from the model's output.
"""
from __future__ import annotations

import torch

from rollout_lab.localize.capture import CapturedToken, row_key
from rollout_lab.localize.divergence import Point, capture_points


def points_of(model) -> list[Point]:
    """The capture points of a transformers causal LM."""
    return capture_points([name for name, _ in model.named_modules()], model.config.num_hidden_layers)


def reference_tokens(model, points: list[Point], sequences: dict[int, list[int]],
                     wanted: list[tuple[int, int]]) -> list[CapturedToken]:
    """The reference's rows at the (request, input position) pairs `wanted`, over each request's token ids."""
    modules = dict(model.named_modules())
    by_request: dict[int, list[int]] = {}
    for request, position in wanted:
        by_request.setdefault(request, []).append(position)
    out = []
    for request, positions in sorted(by_request.items()):
        if max(positions) >= len(sequences[request]):
            raise ValueError(f"request {request} has {len(sequences[request])} tokens; position {max(positions)} was asked for")
        index = torch.tensor(sorted(positions), device=model.device)
        rows: dict[str, torch.Tensor] = {}
        handles = []
        for point in points:
            if point.kind == "logits":
                continue

            def hook(module, args, output, name=row_key(point)):
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                rows[name] = hidden[0].index_select(0, index).float().cpu().clone()

            handles.append(modules[point.module].register_forward_hook(hook))
        try:
            ids = torch.tensor([sequences[request][: int(index.max()) + 1]], device=model.device)
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0]
        finally:
            for handle in handles:
                handle.remove()
        rows["logits"] = logits.index_select(0, index).float().cpu()
        for i, position in enumerate(index.tolist()):
            out.append(CapturedToken(request, position, {name: tensor[i] for name, tensor in rows.items()}))
    return out
