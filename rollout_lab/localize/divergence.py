"""The bookkeeping of a localization: capture points, divergences, clean levels, the first divergence.

Pure logic on tensors and floats (no engine, no model): the unit tests build every case by hand.
A divergence is the relative L2 distance ||vllm - reference|| / ||reference|| of one activation
row (one token at one capture point), so that points of different scales compare on one axis.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from rollout_lab.instrument import ScheduleLog, engine_request_id, join_schedule, token_facts

# The clean level of a point is this many times the largest divergence clean tokens showed there
# (the same replay's unflagged tokens, a stored clean profile): float32 rounding differs from token
# to token, a bug is orders of magnitude above.
CLEAN_MARGIN = 10.0
# No clean level is below this: float32 rounding (eps 1.2e-7) over a few hundred terms.
CLEAN_FLOOR = 1e-6
# The shape rule: a point whose divergence is this many times every earlier point's (and that floor)
# is where the token goes wrong, whatever the clean tokens say. Clean float32 divergence grows by at
# most ~10x from one point to the next (docs/localize.md); a bug jumps by 10^3 to 10^6.
JUMP = 100.0
# The least divergence the shape rule compares with, per engine dtype: ten of its rounding steps, so
# that a bfloat16 engine's rounding at layer 0 (~1e-2 over an exact embedding) is no jump.
SHAPE_FLOOR = {"float32": 10 * 1.2e-7, "bfloat16": 10 * 7.8e-3, "float16": 10 * 9.8e-4}
# Capture-point kinds in forward order within a decoder layer; "mixer" is attention or Mamba.
KINDS = ("embedding", "attention", "mamba", "mlp", "residual", "final_norm", "logits")
KIND_LABEL = {
    "embedding": "embedding output",
    "attention": "attention output",
    "mamba": "Mamba mixer output",
    "mlp": "MLP output",
    "residual": "residual stream",
    "final_norm": "final norm output",
    "logits": "logits",
}


@dataclass(frozen=True)
class Point:
    """One captured activation: a module of the model (named as in transformers and vLLM alike)."""

    kind: str
    # The module whose output is captured ("model.layers.3.self_attn"); "" for the logits.
    module: str
    layer: Optional[int] = None

    def label(self) -> str:
        where = f"layer {self.layer} " if self.layer is not None else ""
        return where + KIND_LABEL[self.kind]


def capture_points(module_names: list[str], num_layers: int) -> list[Point]:
    """The points of a decoder-only model, in forward order, from its module names (transformers' layout)."""
    names = set(module_names)
    missing = [n for n in ("model.embed_tokens", "model.norm") if n not in names]
    missing += [f"model.layers.{i}" for i in range(num_layers) if f"model.layers.{i}" not in names]
    if missing:
        raise ValueError(f"the model has no module {missing[0]}; localize needs model.embed_tokens, model.layers.<i>, model.norm")
    points = [Point("embedding", "model.embed_tokens")]
    for i in range(num_layers):
        layer = f"model.layers.{i}"
        mixers = [(kind, f"{layer}.{child}") for kind, child in (("attention", "self_attn"), ("mamba", "mamba"))
                  if f"{layer}.{child}" in names]
        mlps = [f"{layer}.{child}" for child in ("mlp", "shared_mlp") if f"{layer}.{child}" in names]
        if len(mixers) != 1 or len(mlps) != 1:
            raise ValueError(f"{layer} has {len(mixers)} mixers (self_attn, mamba) and {len(mlps)} MLPs (mlp, shared_mlp); localize needs one of each")
        points += [Point(mixers[0][0], mixers[0][1], i), Point("mlp", mlps[0], i), Point("residual", layer, i)]
    return points + [Point("final_norm", "model.norm"), Point("logits", "")]


def divergence(vllm_row: torch.Tensor, reference_row: torch.Tensor) -> float:
    """||vllm - reference|| / ||reference|| of one row; vLLM's padded vocabulary is cut to the reference's."""
    width = min(vllm_row.shape[-1], reference_row.shape[-1])
    a, b = vllm_row[..., :width].double(), reference_row[..., :width].double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def clean_levels(clean: list[list[float]], num_points: int, profile: Optional[list[float]] = None) -> list[Optional[float]]:
    """Per point: CLEAN_MARGIN x the largest clean divergence there (clean tokens' and the stored
    profile's maxima), at least CLEAN_FLOOR; None at every point when there is neither."""
    for row in [*clean, *([profile] if profile is not None else [])]:
        if len(row) != num_points:
            raise ValueError(f"a clean token has {len(row)} divergences, expected {num_points} (one per point)")
    rows = clean + ([profile] if profile is not None else [])
    if not rows:
        return [None] * num_points
    return [max(CLEAN_MARGIN * max(row[p] for row in rows), CLEAN_FLOOR) for p in range(num_points)]


def first_above(divergences: list[float], levels: list[Optional[float]]) -> Optional[int]:
    """Index of the first point whose divergence exceeds its clean level (None: all clean, or no levels)."""
    return next((i for i, (d, level) in enumerate(zip(divergences, levels)) if level is not None and d > level), None)


def first_jump(divergences: list[float], floor: float) -> Optional[int]:
    """Index of the first point whose divergence is JUMP x above every earlier point's and `floor`
    (the shape rule; None: no such point)."""
    earlier = floor
    for i, d in enumerate(divergences):
        if d > JUMP * earlier:
            return i
        earlier = max(earlier, d)
    return None


def is_clean(divergences: list[float], abs_diff: float, threshold: float, floor: float) -> bool:
    """Whether a captured token may set clean levels: unflagged, and no jump anywhere (a bug that
    moved its activations but not yet its logprob past the threshold does not count as clean)."""
    return abs_diff <= threshold and first_jump(divergences, floor) is None


@dataclass
class RequestFacts:
    """What the replay's engine did with one localized token's request."""

    num_preemptions: Optional[int]  # None: this vLLM keeps no per-request count
    num_cached_tokens: int
    # The token was sampled after a preemption of its request (the scheduler's records say so).
    resumed: bool = False
    # The KV block holding the token's input position, all the request's KV blocks then (attention
    # group), and its SSM state slot.
    kv_block: Optional[int] = None
    kv_blocks: list[int] = field(default_factory=list)
    state_slot: Optional[int] = None
    # Blocks (of every cache group) the request held before its last preemption, and who held each next.
    blocks_before_preemption: list[int] = field(default_factory=list)
    next_holders: list[str] = field(default_factory=list)


def request_facts(log: ScheduleLog, request_id: str, prompt_len: int, position: int, num_tokens: int,
                  num_preemptions: Optional[int], num_cached_tokens: int) -> RequestFacts:
    """The scheduler's view of completion token `position` of a request, from the replay's schedule log."""
    ends = join_schedule(log)
    per_token = token_facts(log, ends, request_id, prompt_len, num_tokens)
    facts = RequestFacts(num_preemptions, num_cached_tokens, resumed=per_token.preemptions_before[position] > 0,
                         kv_block=per_token.kv_blocks[position], state_slot=per_token.state_slots[position])
    sampled = ends.get(request_id, {}).get(prompt_len + position)
    attention = [i for i, g in enumerate(log.groups) if not g.is_mamba]
    if sampled is not None and attention:
        facts.kv_blocks = list(sampled.blocks[attention[0]])
    if not facts.resumed or sampled is None:
        return facts
    # The request's last preemption before the token, the blocks it held then, and who got each next.
    steps = [s for s in log.steps if s.step < sampled.step]
    preempted_at = max(s.step for s in steps if request_id in {engine_request_id(r) for r in s.preempted})
    held: list[int] = []
    for s in steps:
        if s.step <= preempted_at:
            for internal, scheduled in s.requests.items():
                if engine_request_id(internal) == request_id:
                    held = sorted({b for group in scheduled.blocks for b in group})
    # Steps counted from the replay's first (the engine's own counter runs on across replays).
    base = log.steps[0].step
    for block in held:
        holder = next((f"request {engine_request_id(internal)} at step {s.step - base}" for s in log.steps
                       if s.step > preempted_at for internal, scheduled in s.requests.items()
                       if engine_request_id(internal) != request_id and any(block in group for group in scheduled.blocks)), "")
        facts.blocks_before_preemption.append(block)
        facts.next_holders.append(holder)
    return facts


@dataclass
class TokenLocalization:
    """One token: its divergence at every point, against the clean levels."""

    request: int
    # Completion position (as in the token table); the activations are at prompt_len + position - 1.
    position: int
    input_position: int
    token_id: int
    # |vLLM - transformers float32| logprob of the token in the capture replay.
    abs_diff: float
    flagged: bool
    divergences: list[float]
    facts: RequestFacts
    first: Optional[int] = None
    # Which rule named `first`: "clean level", "shape" or "clean level and shape" ("" where none did).
    rule: str = ""
    # Where each rule alone would put the first divergence (None: nowhere).
    level_first: Optional[int] = None
    shape_first: Optional[int] = None

    def growth(self, points: list[Point]) -> str:
        """How the divergence grows after its first point: there, at the final norm, at the logits."""
        if self.first is None:
            return "no point above its clean level"
        at = {p.kind: d for p, d in zip(points, self.divergences) if p.kind in ("final_norm", "logits")}
        return (f"{self.divergences[self.first]:.3g} at {points[self.first].label()}, "
                f"{at['final_norm']:.3g} at the final norm, {at['logits']:.3g} at the logits")


def localize_token(token: TokenLocalization, levels: list[Optional[float]], shape_floor: Optional[float] = None) -> TokenLocalization:
    """The token with its first divergence set: the earlier of the first point above its clean level
    and the first jump (the shape rule; off with shape_floor None, as for the bitwise on-policy check)."""
    token.level_first = first_above(token.divergences, levels)
    token.shape_first = None if shape_floor is None else first_jump(token.divergences, shape_floor)
    named = [i for i in (token.level_first, token.shape_first) if i is not None]
    token.first = min(named) if named else None
    token.rule = " and ".join(rule for rule, i in (("clean level", token.level_first), ("shape", token.shape_first))
                              if i is not None and i == token.first)
    return token


def rule_text(token: TokenLocalization, points: list[Point], levels: list[Optional[float]], shape_floor: Optional[float]) -> str:
    """Which rule named the token's first point, with its numbers."""
    if token.first is None:
        return "no rule named a point"
    d = token.divergences[token.first]
    parts = []
    if token.level_first == token.first:
        level = levels[token.first]
        # Level 0 is the on-policy check's (--against trainer, bitwise): no ratio to give.
        parts.append(f"clean level: {d:.3g} > {level:.3g}" + (f" ({d / level:.3g}x)" if level > 0 else ""))
    elif token.level_first is not None:
        parts.append(f"clean level: first above at {points[token.level_first].label()}")
    elif all(level is None for level in levels):
        parts.append("clean level: none (no clean token, no stored profile)")
    else:
        parts.append("clean level: no point above")
    if token.shape_first == token.first:
        earlier = max([shape_floor or 0.0, *token.divergences[: token.first]])
        parts.append(f"shape: {d:.3g} is {d / earlier:.3g}x the largest earlier divergence or floor ({earlier:.3g})")
    elif token.shape_first is not None:
        parts.append(f"shape: first jump at {points[token.shape_first].label()}")
    elif shape_floor is not None:
        parts.append("shape: no jump")
    return f"named by {token.rule}; " + "; ".join(parts)


def _ranges(positions: list[int]) -> str:
    """'37-40, 44' from [37, 38, 39, 40, 44]."""
    runs: list[list[int]] = []
    for p in sorted(set(positions)):
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def why(facts: RequestFacts) -> str:
    """The request's scheduling in words: preempted and resumed, prefix-cache hit, or neither."""
    parts = []
    if facts.resumed:
        parts.append("resumed after preemption")
    elif facts.num_preemptions:
        parts.append(f"preempted {facts.num_preemptions}x")
    if facts.num_cached_tokens:
        parts.append(f"{facts.num_cached_tokens} prompt tokens from the prefix cache")
    where = []
    if facts.kv_blocks:
        where.append(f"KV blocks {_ranges(facts.kv_blocks)}")
    if facts.state_slot is not None:
        where.append(f"state slot {facts.state_slot}")
    if facts.blocks_before_preemption:
        held = ", ".join(f"{b} (next held by {h})" if h else str(b)
                         for b, h in zip(facts.blocks_before_preemption, facts.next_holders))
        where.append(f"blocks before the preemption {held}")
    return "; ".join([", ".join(parts) or "not preempted, no prefix-cache hit", *where])


def summary_lines(tokens: list[TokenLocalization], points: list[Point]) -> list[str]:
    """One line per (first point, request): 'first divergence: layer 0 attention output at positions 37-40 of request 12, ...'."""
    groups: dict[tuple[Optional[int], int], list[TokenLocalization]] = {}
    for token in tokens:
        groups.setdefault((token.first, token.request), []).append(token)
    lines = []
    for (first, request), group in sorted(groups.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0, kv[0][1])):
        positions = sorted({t.position for t in group})
        where = f"position{'s' if len(positions) > 1 else ''} {_ranges(positions)} of request {request}"
        if first is None:
            lines.append(f"no divergence above the clean level: {where} ({why(group[0].facts)})")
        else:
            rules = " / ".join(dict.fromkeys(t.rule for t in group))
            lines.append(f"first divergence: {points[first].label()} at {where}, {why(group[0].facts)} (named by {rules})")
    return lines
