"""A localization on disk: localization.json (the typed result, read back by `read`), LOCALIZE.md, one PNG per token."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from rollout_lab.localize.divergence import CLEAN_MARGIN, JUMP, Point, RequestFacts, TokenLocalization, rule_text, summary_lines
from rollout_lab.wandb_log import LayerCurves

# <run_dir>/localize/ holds a run's localization (the minimizer's REPORT.md reads it from there).
DIR_NAME = "localize"
RESULT_NAME = "localization.json"
REPORT_NAME = "LOCALIZE.md"


@dataclass
class Localization:
    """Where inside the model one failing step's worst tokens go wrong."""

    source: str  # the run dir or case file
    model: str
    fault: Optional[str]  # the planted fault that ran in the replay (None: vLLM as shipped)
    description: str  # the failure, as the run dir says
    points: list[Point]
    # Per point; None where no clean token and no stored profile gave one (the shape rule alone decides).
    clean_levels: list[Optional[float]]
    # Clean tokens of the capture replay the clean levels were measured on (unflagged, no jump).
    num_clean_tokens: int
    tokens: list[TokenLocalization]
    seconds: float = 0.0
    # Tokens whose replay sampled differently from the selecting replay (the engine was not deterministic).
    warnings: list[str] = field(default_factory=list)
    # Where the clean levels came from, in words (the replay's clean tokens, a stored profile).
    clean_source: str = ""
    # The shape rule's floor (divergence.SHAPE_FLOOR of the engine's dtype); None: the rule was off.
    shape_floor: Optional[float] = None
    # Per point, the largest divergence of the replay's clean tokens (None: there were none).
    clean_max: list[Optional[float]] = field(default_factory=list)
    # The key a clean profile of this model and setting is stored under (profile.profile_key).
    profile_key: str = ""
    # Requests each replay ran first, not judged (a history-dependent case's Case.warmup).
    warmup_requests: int = 0

    def summary(self) -> list[str]:
        return summary_lines(self.tokens, self.points)


def read(path: Path | str) -> Localization:
    """A localization.json back as a Localization."""
    data = json.loads(Path(path).read_text())
    data["points"] = [Point(**p) for p in data["points"]]
    data["tokens"] = [TokenLocalization(**(t | {"facts": RequestFacts(**t["facts"])})) for t in data["tokens"]]
    return Localization(**data)


def _x(point: Point, points: list[Point]) -> int:
    """A point's place on the layer axis: its layer; -1 for the embedding, one past the last layer after it."""
    if point.layer is not None:
        return point.layer
    return -1 if point.kind == "embedding" else max(p.layer for p in points if p.layer is not None) + 1


def _by_kind(result: Localization) -> dict[str, list[int]]:
    """Indices of the points of each kind, in forward order."""
    kinds: dict[str, list[int]] = {}
    for i, point in enumerate(result.points):
        kinds.setdefault(point.kind, []).append(i)
    return kinds


def layer_curves(result: Localization) -> list[LayerCurves]:
    """The per-token curves W&B charts: one series per kind of point."""
    kinds = _by_kind(result)
    return [LayerCurves(f"request {t.request} position {t.position}", list(kinds),
                        [[_x(result.points[i], result.points) for i in idx] for idx in kinds.values()],
                        [[t.divergences[i] for i in idx] for idx in kinds.values()]) for t in result.tokens]


def plot(result: Localization, token: TokenLocalization, path: Path) -> None:
    """Divergence against layer (log scale): one line per kind of point, the clean levels dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, idx in _by_kind(result).items():
        x = [_x(result.points[i], result.points) for i in idx]
        (line,) = ax.plot(x, [max(token.divergences[i], 1e-12) for i in idx], marker="o", markersize=3, label=kind)
        if all(result.clean_levels[i] is not None for i in idx):
            ax.plot(x, [max(result.clean_levels[i], 1e-12) for i in idx], linestyle="--", linewidth=0.8, color=line.get_color())
    if token.first is not None:
        first = result.points[token.first]
        ax.axvline(_x(first, result.points), color="red", linewidth=0.8)
        ax.set_title(f"request {token.request}, position {token.position}: first divergence at {first.label()}", fontsize=9)
    else:
        ax.set_title(f"request {token.request}, position {token.position}: no point above its clean level", fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("layer (-1: embedding, last+1: final norm and logits)")
    ax.set_ylabel("||vLLM - transformers|| / ||transformers||")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: Localization, images: list[str]) -> str:
    """LOCALIZE.md: the summary lines, then per token where it first goes wrong and how that grows."""
    if result.shape_floor is None:
        levels = "clean level 0 at every point: the on-policy check (--against trainer), bitwise against the trainer's own dtype and kernels"
    else:
        levels = (f"two rules name a token's first point, the earlier wins: the **clean level** of each point, {CLEAN_MARGIN:g}x the "
                  f"largest divergence of clean tokens there ({result.clean_source}), and the **shape**, the first point "
                  f"{JUMP:g}x above every earlier point's divergence and {result.shape_floor:.3g}")
    lines = [f"# Where it fails inside the model: {result.source}", "",
             f"{result.description}. Model `{result.model}`, fault `{result.fault or 'none'}`; {levels} "
             f"({result.seconds:.0f} s).", "", *([f"Each replay ran the case's warm-up of {result.warmup_requests} request(s) first "
                                                  "(the engine's history the failure needs), captured nothing of it.", ""]
                                                 if result.warmup_requests else []),
             *[f"- {line}" for line in result.summary()], ""]
    lines += [f"- warning: {w}" for w in result.warnings]
    for token, image in zip(result.tokens, images):
        lines += [f"## Request {token.request}, position {token.position} (token {token.token_id})", "",
                  f"|logprob diff| {token.abs_diff:.3g}{' (flagged)' if token.flagged else ''}; {token.growth(result.points)}.", "",
                  f"{rule_text(token, result.points, result.clean_levels, result.shape_floor)}.", "",
                  f"![divergence by layer]({image})", "",
                  "| point | divergence | clean level |", "| --- | --- | --- |"]
        for i, (point, value, level) in enumerate(zip(result.points, token.divergences, result.clean_levels)):
            mark = " **first**" if i == token.first else (" above" if level is not None and value > level else "")
            lines.append(f"| {point.label()} | {value:.3g}{mark} | {'-' if level is None else f'{level:.3g}'} |")
        lines.append("")
    return "\n".join(lines)


def write(result: Localization, out_dir: Path) -> Path:
    """localization.json, the PNGs and LOCALIZE.md into out_dir; returns LOCALIZE.md's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_NAME).write_text(json.dumps(asdict(result), indent=1))
    images = []
    for token in result.tokens:
        name = f"request{token.request}_position{token.position}.png"
        plot(result, token, out_dir / name)
        images.append(name)
    path = out_dir / REPORT_NAME
    path.write_text(markdown(result, images))
    return path


def where_inside(run_dir: Path | str) -> list[str]:
    """REPORT.md's "Where it fails inside the model" lines: the run's localization summary, or the command that makes one."""
    path = Path(run_dir) / DIR_NAME / RESULT_NAME
    if not path.is_file():
        return [f"- Where it fails inside the model: not localized yet (`python -m rollout_lab.localize {run_dir}`)."]
    return ["- Where it fails inside the model (`python -m rollout_lab.localize`):", *[f"  - {line}" for line in read(path).summary()]]
