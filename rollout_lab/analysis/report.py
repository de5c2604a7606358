"""The sweep report: a sweep dir in; SWEEP_REPORT.md, sweep_report.json, plots and a W&B run out.

    <sweep_dir>/SWEEP_REPORT.md              ranked verdicts with a sentence each and the next sweep,
                                             run signatures, runs not run (refused by vLLM), broken runs, all tests
    <sweep_dir>/sweep_report.json            the same as data
    <sweep_dir>/analysis/<variable>-<feature>.png   each moved feature against its variable
    <sweep_dir>/analysis/wandb/offline-run-* the report in W&B, grouped with the sweep's runs
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rollout_lab.analysis.outcome import fmt_value, next_sweep_command
from rollout_lab.analysis.signature import BrokenRun, RunSignature, read_sweep
from rollout_lab.analysis.verdict import (
    ALPHA,
    MIN_EFFECT,
    VariableVerdict,
    bin_codes,
    group_runs,
    grouped_tokens,
    variable_verdicts,
)

REPORT_FILE = "SWEEP_REPORT.md"
JSON_FILE = "sweep_report.json"
PLOT_DIR = "analysis"


class SweepDirError(ValueError):
    """A sweep dir that does not exist or holds no run at all."""


@dataclass
class SweepReport:
    """Everything the analysis of one sweep found."""

    sweep_dir: str
    runs: list[RunSignature]
    # Runs vLLM refused to start: listed apart, in no test.
    not_run: list[RunSignature]
    broken: list[BrokenRun]
    variables: dict[str, list[Any]]
    verdicts: list[VariableVerdict]
    # The command of the next sweep per variable with a threshold.
    next_sweeps: dict[str, str] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    wandb_dir: Optional[str] = None

    def to_dict(self) -> dict:
        return {
            "sweep_dir": self.sweep_dir,
            "variables": self.variables,
            "verdicts": [v.to_dict() | {"next_sweep": self.next_sweeps.get(v.variable)} for v in self.verdicts],
            "runs": [r.to_dict() for r in self.runs],
            "not_run": [r.to_dict() for r in self.not_run],
            "broken": [asdict(b) for b in self.broken],
            "plots": self.plots,
            "wandb_dir": self.wandb_dir,
        }


def analyze_sweep(sweep_dir: Path, seed: int = 0, wandb_mode: Optional[str] = None) -> SweepReport:
    """Analyze a sweep dir and write the report, JSON and plots into it; log it to W&B.

    wandb_mode: offline, online or disabled; None follows the runs' logger.mode.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepDirError(f"sweep dir {sweep_dir} does not exist")
    sweep = read_sweep(sweep_dir)
    if not sweep.runs and not sweep.not_run and not sweep.broken:
        raise SweepDirError(f"sweep dir {sweep_dir} holds no run (no numbered job dir, no multirun.yaml)")
    verdicts = variable_verdicts(sweep.runs, seed, sweep.not_run)
    report = SweepReport(str(sweep_dir), sweep.runs, sweep.not_run, sweep.broken, {v.variable: v.values for v in verdicts}, verdicts)
    report.next_sweeps = {v.variable: next_sweep_command(v.variable, v.next_values, sweep.overrides) for v in verdicts if v.next_values}
    report.plots = plot_moved(report, sweep_dir / PLOT_DIR)
    (sweep_dir / REPORT_FILE).write_text(markdown(report))
    mode = wandb_mode or _runs_value(report.runs, "logger.mode", "offline")
    if mode != "disabled":
        report.wandb_dir = log_wandb(report, mode)
    (sweep_dir / JSON_FILE).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return report


def _runs_value(runs: list[RunSignature], key: str, default: Any) -> Any:
    values = {run.config.get(key) for run in runs} - {None}
    return values.pop() if len(values) == 1 else default


def _fmt(value: Any) -> str:
    return "-" if value is None else fmt_value(value)


def _where(run: RunSignature) -> str:
    spans = [f"{s.feature} {s.low}" if s.low == s.high else f"{s.feature} {s.low}..{s.high} (median {s.median:g})" for s in run.where]
    return "; ".join(spans) or "-"


def verdict_rows(report: SweepReport) -> list[list[str]]:
    """The ranked table, one row per variable, columns as VERDICT_HEADER."""
    rows = []
    for v in report.verdicts:
        head = v.headline
        test = [head.feature, head.test, _fmt(head.statistic), _fmt(head.p_adjusted), f"{head.effect_name} {head.effect_size:.3g}"] if head else ["-"] * 5
        rows.append([v.variable, v.verdict, v.sentence, *test, ", ".join(t.feature for t in v.moved) or "-"])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [line(header), "|" + "---|" * len(header)] + [line(row) for row in rows]
    return "\n".join(lines)


VERDICT_HEADER = ["variable", "verdict", "what it means", "headline feature", "test", "statistic", "p (Holm)", "effect", "features that moved"]


def markdown(report: SweepReport) -> str:
    """SWEEP_REPORT.md: what a person reads after a sweep."""
    out = [f"# Sweep report: {report.sweep_dir}", ""]
    swept = "; ".join(f"`{k}` = " + ", ".join(map(_fmt, v)) for k, v in report.variables.items())
    out.append(f"{len(report.runs)} runs analyzed, {len(report.not_run)} not run (refused by vLLM), {len(report.broken)} not analyzed. "
               f"Swept: {swept or 'nothing varies between the runs that ran'}.")
    out += ["", "## Verdicts, strongest first", ""]
    if report.not_run and not report.runs:
        out.append("Every point was refused by vLLM at start: no run, no verdict (see Not run).")
    elif not report.verdicts:
        out.append("Nothing to judge: no config key differs between the runs that could be analyzed.")
    out += [_table(VERDICT_HEADER, verdict_rows(report)), ""]
    for v in report.verdicts:
        out.append(f"- `{v.variable}`: **{v.verdict}**: {v.sentence} ({v.reason})")
        if v.variable in report.next_sweeps:
            out.append(f"  Next sweep, between {_fmt(v.threshold[0])} and {_fmt(v.threshold[1])}: `{report.next_sweeps[v.variable]}`")
    out += ["", "## Failure signature per run", ""]
    header = ["run", *report.variables, "status", "outcome", "crash", "spike rate", "|diff| p50", "p99", "max",
              "requests affected", "first spike step", "top-10% share", "spikes fall at", "shift (rollout_lab/shift.py)"]
    rows = []
    for run in report.runs:
        q = run.abs_diff_quantiles
        rows.append([run.name, *(_fmt(run.config.get(k)) for k in report.variables), run.status, run.outcome,
                     f"{run.crash_key} at step {run.crash_step}: {run.crash_message}" if run.crash_key else "-",
                     _fmt(run.spike_rate), _fmt(q.get("p50")), _fmt(q.get("p99")), _fmt(q.get("max")),
                     _fmt(run.affected_request_share), _fmt(run.first_spike_step), _fmt(run.spike_concentration), _where(run),
                     run.shift.headline.sentence() if run.shift is not None and run.shift.shifted else "-"])
    out += [_table(header, rows), ""]
    if report.not_run:
        out += ["## Not run: configurations vLLM refused at start", "",
                "Left out of every test: there is no result, only vLLM's reason.", "",
                _table(["run", *report.variables, "vLLM's reason"],
                       [[r.name, *(_fmt(r.config.get(k)) for k in report.variables), r.refusal or "-"] for r in report.not_run]), ""]
    if report.broken:
        out += ["## Runs not analyzed", "", _table(["run", "run dir", "problem"], [[b.name, b.run_dir, b.problem] for b in report.broken]), ""]
    out += ["## Every test", ""]
    for v in report.verdicts:
        out += [f"### `{v.variable}` ({v.verdict})", ""]
        if not v.tests:
            out += [v.reason, ""]
            continue
        out.append(_table(["feature", "kind", "test", "statistic", "p", "p (Holm)", "effect", "moved"], [
            [t.feature, t.kind, t.test, _fmt(t.statistic), _fmt(t.p_value) if t.p_value is not None else "facts",
             _fmt(t.p_adjusted), f"{t.effect_name} {t.effect_size:.3g}", "yes" if t.moved else "no"] for t in v.tests]))
        out.append("")
    if report.plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).relative_to(report.sweep_dir)})" for p in report.plots] + [""]
    out += ["## How to read this", "",
            "A feature moved when its Holm-adjusted p-value is below "
            f"{ALPHA} and its effect reaches the minimum ({', '.join(f'{k} {v}' for k, v in MIN_EFFECT.items())}). "
            "Structure features (the outcome class of each run: clean, silent mismatch, sync mismatch, crash by its key; "
            "the shape of log |difference| after standardizing each run, "
            "where the larger differences fall, the share of requests affected) say the variable changes where and how "
            "runs fail; a variable whose values move runs between outcome classes switches the failure, and its threshold "
            "lies between the last value of one class and the first of the next. "
            "Magnitude features (per-request max |difference|, spike rate) say it changes only how much. "
            "Method: rollout_lab/analysis/verdict.py.", ""]
    return "\n".join(out)


def print_report(report: SweepReport) -> None:
    """The ranked verdict table and the broken runs, on the console."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title=f"sweep {report.sweep_dir}: {len(report.runs)} runs, {len(report.not_run)} not run, {len(report.broken)} not analyzed")
    colour = {"structural": "red", "magnitude-only": "yellow", "none": "green", "no verdict": "dim"}
    # The test's name and statistic are in SWEEP_REPORT.md; the console keeps to 80 columns.
    columns = {0: "variable", 1: "verdict", 3: "strongest", 6: "p Holm", 7: "effect"}
    for name in columns.values():
        table.add_column(name, no_wrap=True)
    rows = verdict_rows(report)
    for row in rows:
        cells = [row[i] for i in columns]
        cells[1] = f"[{colour[row[1]]}]{row[1]}[/]"
        table.add_row(*cells)
    console.print(table)
    for row in rows:
        console.print(f"{row[0]}: {row[2]} (moved: {row[8]})", soft_wrap=True, markup=False)
        if row[0] in report.next_sweeps:
            console.print(f"  next sweep: {report.next_sweeps[row[0]]}", soft_wrap=True, markup=False)
    for r in report.not_run:
        console.print(f"[yellow]not run[/] run {r.name}: vLLM refused it: {escape(r.refusal or '')}", soft_wrap=True)
    for b in report.broken:
        console.print(f"[red]not analyzed[/] run {b.name}: {b.problem}")
    console.print(f"report: {Path(report.sweep_dir) / REPORT_FILE}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def plot_moved(report: SweepReport, out_dir: Path) -> list[str]:
    """One PNG per moved feature of each variable, against the variable's values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for verdict in report.verdicts:
        if not verdict.moved:
            continue
        groups = group_runs(report.runs, verdict.variable, verdict.values)
        tokens = grouped_tokens(groups)
        labels = [_fmt(v) for v in verdict.values]
        for test in verdict.moved:
            location = test.feature not in ("outcome", "shape", "magnitude", "spike_rate", "affected_requests")
            fig, axes = plt.subplots(1, 2 if location else 1, figsize=(10.0 if location else 6.4, 4.0), squeeze=False)
            if test.feature == "outcome":
                _plot_outcome(axes[0, 0], groups, labels)
            elif test.feature == "shape":
                _plot_shape(axes[0, 0], tokens, labels)
            elif location:
                _plot_location(axes[0], tokens, labels, test.feature)
            else:
                _plot_per_request(axes[0, 0], tokens, labels, test.feature)
            for ax in axes[0]:
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(title=verdict.variable, fontsize=7, title_fontsize=7)
                if not ax.get_xlabel():
                    ax.set_xlabel(verdict.variable)
            fig.suptitle(f"{test.feature} vs {verdict.variable}: {test.effect_name} {test.effect_size:.2g}, p(Holm) {_fmt(test.p_adjusted)}", fontsize=9)
            fig.tight_layout()
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{_slug(verdict.variable)}-{test.feature}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(str(path))
    return paths


def _plot_outcome(ax, groups: list[list[RunSignature]], labels: list[str]) -> None:
    ends = sorted({run.label for runs in groups for run in runs})
    bottom = np.zeros(len(groups))
    for end in ends:
        counts = np.array([sum(run.label == end for run in runs) for runs in groups])
        ax.bar(np.arange(len(labels)), counts, bottom=bottom, label=end[:60])
        bottom += counts
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_ylabel("runs")


def _plot_shape(ax, tokens, labels: list[str]) -> None:
    for g, label in enumerate(labels):
        z = np.sort(tokens.loc[tokens["group"] == g, "z"].to_numpy())
        if z.size:
            ax.step(z, np.arange(1, z.size + 1) / z.size, where="post", label=label)
    ax.set_xlabel("log10 |diff|, standardized per run (median 0, IQR 1)")
    ax.set_ylabel("share of tokens")


def _plot_per_request(ax, tokens, labels: list[str], feature: str) -> None:
    per_request = tokens.groupby("request").agg(group=("group", "first"), magnitude=("log_diff", "max"),
                                                spike_rate=("spike", "mean"), affected_requests=("spike", "any"))
    series = [per_request.loc[per_request["group"] == g, feature].to_numpy(dtype=float) for g in range(len(labels))]
    if feature == "affected_requests":
        ax.bar(np.arange(len(labels)), [s.mean() if s.size else 0.0 for s in series])
        ax.set_xticks(np.arange(len(labels)), labels)
        ax.set_ylabel("share of requests with a spike")
    else:
        ax.boxplot([s if s.size else [np.nan] for s in series], tick_labels=labels)
        ax.set_ylabel({"magnitude": "per-request log10 max |diff|", "spike_rate": "per-request spike rate"}[feature])


def _plot_location(axes, tokens, labels: list[str], feature: str) -> None:
    """Left: where each value's spikes fall. Right: what the test compares, mean within-run rank."""
    rows = tokens[tokens[feature].notna()]
    codes, names = bin_codes(rows[feature].to_numpy(dtype=np.int64))
    group, spike, rank = rows["group"].to_numpy(), rows["spike"].to_numpy(), rows["rank"].to_numpy()
    for g, label in enumerate(labels):
        mine = group == g
        if not mine.any():
            continue
        spikes = max(int(spike[mine].sum()), 1)
        share = [spike[mine & (codes == c)].sum() / spikes for c in range(len(names))]
        mean_rank = [rank[mine & (codes == c)].mean() if (mine & (codes == c)).any() else np.nan for c in range(len(names))]
        axes[0].plot(np.arange(len(names)), share, marker="o", label=label)
        axes[1].plot(np.arange(len(names)), mean_rank, marker="o", label=label)
    axes[0].set_ylabel("share of the run's spikes")
    axes[1].set_ylabel("mean percentile rank of |diff| in its run")
    for ax in axes:
        ax.set_xticks(np.arange(len(names)), names, fontsize=7)
        ax.set_xlabel(feature)


def log_wandb(report: SweepReport, mode: str) -> Optional[str]:
    """The report as a W&B run in the sweep's group: verdict and run tables, plots; returns its dir."""
    import wandb

    sweep_dir = Path(report.sweep_dir)
    group = _runs_value(report.runs, "logger.group", None) or sweep_dir.name
    out_dir = sweep_dir / PLOT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=_runs_value(report.runs, "logger.project", "rollout_lab"),
        entity=_runs_value(report.runs, "logger.entity", None),
        group=group,
        job_type="sweep_analysis",
        name=f"analysis-{sweep_dir.name}",
        dir=str(out_dir),
        mode=mode,
        config={"sweep_dir": str(sweep_dir), "variables": report.variables},
        settings=wandb.Settings(silent=True, console="off"),
    )
    verdicts = wandb.Table(columns=VERDICT_HEADER, data=verdict_rows(report))
    runs = wandb.Table(
        columns=["run", "status", "outcome", "crash_key", "spike_rate", "abs_diff_max", "affected_request_share", "first_spike_step"],
        data=[[r.name, r.status, r.outcome, r.crash_key, r.spike_rate, r.abs_diff_quantiles.get("max"), r.affected_request_share,
               r.first_spike_step] for r in [*report.runs, *report.not_run]],
    )
    payload: dict[str, Any] = {"sweep/verdicts": verdicts, "sweep/runs": runs}
    payload |= {f"sweep/plots/{Path(p).stem}": wandb.Image(p) for p in report.plots}
    run.log(payload)
    for v in report.verdicts:
        run.summary[f"verdict/{v.variable}"] = v.verdict
        run.summary[f"sentence/{v.variable}"] = v.sentence
    run.summary["runs_analyzed"], run.summary["runs_broken"] = len(report.runs), len(report.broken)
    run.summary["runs_not_run"] = len(report.not_run)
    wandb_dir = str(Path(run.dir).parent)
    run.finish()
    return wandb_dir
