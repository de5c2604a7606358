"""The mismatch budget: how much of a run's |sampler - trainer| each recorded factor explains (docs/shift.md).

    python -m rollout_lab.shift_budget RUN_DIR   # mismatch_budget.md and mismatch_budget.png in the run dir
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from rollout_lab.shift_conditions import FACTORS, shift_frame


# Factors the records cannot separate, and the controlled replay that would measure each.
REPLAY_FACTORS = {
    "trainer self-noise": "re-score the recorded sequences with the trainer twice, at another trainer.micro_batch_size",
    "dtype floor": "replay the recorded requests with engine and trainer in float32 (minimize's replay_case)",
    "batch composition": "re-score each recorded request alone (the hunt's metamorphic oracle) beside its batched logprobs",
}


@dataclass
class BudgetRow:
    """One factor's share of a run's |difference| variance (eta^2, between its levels), or the replay it needs."""

    factor: str
    eta_squared: Optional[float]
    levels: dict[str, float]  # mean |difference| per level
    note: str = ""


def mismatch_budget(frame: pd.DataFrame) -> list[BudgetRow]:
    """Per recorded factor, eta^2 of |difference| across its levels (factors overlap: shares need not add up);
    the factors only a replay can measure, with that replay."""
    total = float(((frame["abs_diff"] - frame["abs_diff"].mean()) ** 2).sum())
    rows = []
    for name, factor in FACTORS.items():
        if name == "all":
            continue
        levels = factor.levels(frame)
        known = frame[levels.notna()].assign(level=levels[levels.notna()])
        if known.empty or known["level"].nunique() < 2 or total == 0:
            rows.append(BudgetRow(name, None, {}, "one level only in this run" if not known.empty else "not recorded"))
            continue
        means = known.groupby("level")["abs_diff"].agg(["mean", "size"])
        between = float((means["size"] * (means["mean"] - known["abs_diff"].mean()) ** 2).sum())
        rows.append(BudgetRow(name, between / total, means["mean"].round(6).to_dict()))
    rows += [BudgetRow(name, None, {}, f"not in the records; measured by: {replay}") for name, replay in REPLAY_FACTORS.items()]
    return rows


def write_budget(frame: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """mismatch_budget.md (the table) and mismatch_budget.png (the bars) in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = mismatch_budget(frame)
    lines = [f"# Mismatch budget: {len(frame)} tokens, mean |difference| {frame['abs_diff'].mean():.4g}", "",
             "| factor | share of variance (eta^2) | mean \\|difference\\| per level |", "| --- | --- | --- |"]
    for row in rows:
        share = f"{row.eta_squared:.3f}" if row.eta_squared is not None else "-"
        lines.append(f"| {row.factor} | {share} | {', '.join(f'{k}: {v:.4g}' for k, v in row.levels.items()) or row.note} |")
    table = Path(out_dir) / "mismatch_budget.md"
    table.write_text("\n".join(lines) + "\n")
    measured = [r for r in rows if r.eta_squared is not None]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(measured) + 1.2))
    ax.barh([r.factor for r in measured], [r.eta_squared for r in measured])
    ax.set_xlabel("share of |difference| variance explained (eta^2)")
    ax.set_title("mismatch budget (recorded factors)")
    fig.tight_layout()
    plot = Path(out_dir) / "mismatch_budget.png"
    fig.savefig(plot)
    plt.close(fig)
    return table, plot


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m rollout_lab.shift_budget RUN_DIR`: write the run's mismatch budget table and plot."""
    import argparse

    from rollout_lab.records import RecordsError

    parser = argparse.ArgumentParser(description="How much of a run's |sampler - trainer| each recorded factor explains.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        frame = shift_frame(args.run_dir)
    except RecordsError as exc:
        raise SystemExit(f"rollout_lab.shift_budget: {exc}") from None
    print("wrote", *write_budget(frame, Path(args.run_dir)))


if __name__ == "__main__":
    main()
