"""The hunt report: the store, coverage and timeline in; HUNT_REPORT.md, findings.csv, plots and a W&B run out.

    <hunt_dir>/HUNT_REPORT.md            header, ranked findings, coverage, rejected and broken configurations
    <hunt_dir>/findings.csv              the findings table as data
    <hunt_dir>/findings_over_time.png    findings and trials against elapsed seconds
    <hunt_dir>/coverage_over_time.png    value and pair coverage against elapsed seconds
    <hunt_dir>/wandb/offline-run-*       the same summary in W&B (job_type "hunt")

The timeline is one tuple per engine group: (elapsed_s, trials, findings, value coverage, pair coverage).
"""
from __future__ import annotations

import csv
import itertools
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from rollout_lab.hunt.constraints import Learned
from rollout_lab.hunt.protocol import Finding
from rollout_lab.oracles import trial_oracles
from rollout_lab.hunt.search import Coverage
from rollout_lab.hunt.space import HuntRunConfig
from rollout_lab.hunt.store import Store, TrialRow

REPORT_FILE = "HUNT_REPORT.md"
CSV_FILE = "findings.csv"
FINDINGS_PLOT = "findings_over_time.png"
COVERAGE_PLOT = "coverage_over_time.png"
TRIAL_STATUSES = ("ok", "fail", "crash", "hang", "harness_error")
BROKEN_GROUP_STATUSES = ("hang", "crash", "died")
LEAST_COVERED_PAIRS = 5

FINDINGS_HEADER = ["rank", "signature", "kind", "first trial", "trials to find", "time to find (s)", "trials hit",
                   "trigger", "repro", "repro rate", "state"]


def write(hunt_dir: Path, store: Store, coverage: Coverage, timeline: list, cfg: HuntRunConfig) -> Path:
    """Write the report, CSV and plots into hunt_dir and log them to W&B; returns HUNT_REPORT.md's path.

    The Markdown is written before W&B is touched, so a W&B failure (a one-line warning) loses nothing.
    """
    hunt_dir = Path(hunt_dir)
    hunt_dir.mkdir(parents=True, exist_ok=True)
    rows = finding_rows(ranked(store.findings()))
    with (hunt_dir / CSV_FILE).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FINDINGS_HEADER)
        writer.writerows(rows)
    plots = plot_timeline(timeline, hunt_dir)
    path = hunt_dir / REPORT_FILE
    path.write_text(markdown(hunt_dir, store, coverage, rows, plots, cfg, wandb_line=None))
    mode = cfg.logger.mode or "offline"
    if mode == "disabled":
        return path
    try:
        wandb_dir = log_wandb(hunt_dir, store, coverage, timeline, rows, plots, cfg, mode)
        wandb_line = f"W&B ({mode}): `{_relative(wandb_dir, hunt_dir)}`"
    except Exception as exc:  # W&B's own failures are many and varied; the report must survive all of them
        message = str(exc).splitlines()[0] if str(exc) else ""
        print(f"rollout_lab.hunt: W&B logging failed, report kept: {type(exc).__name__}: {message}", file=sys.stderr)
        wandb_line = f"W&B: not logged ({type(exc).__name__}: {message})"
    path.write_text(markdown(hunt_dir, store, coverage, rows, plots, cfg, wandb_line))
    return path


def ranked(findings: list[Finding]) -> list[Finding]:
    """Verified repros first, then the most trials hit, then the earliest found."""
    return sorted(findings, key=lambda f: (f.state != "verified", -f.trials, f.first_elapsed))


def _kind(finding: Finding) -> str:
    return f"mismatch/{finding.signature.oracle}" if finding.kind == "mismatch" else finding.kind


def trigger_text(trigger: Optional[list]) -> str:
    if trigger is None:
        return "-"
    return ", ".join(map(str, trigger)) or "none (fails at defaults)"


def _relative(path: Optional[str], hunt_dir: Path) -> str:
    if not path:
        return "-"
    try:
        return str(Path(path).resolve().relative_to(hunt_dir.resolve()))
    except ValueError:
        return str(path)


def finding_rows(findings: list[Finding]) -> list[list[str]]:
    """One row per finding, in the given order, columns as FINDINGS_HEADER (repro paths as stored:
    relative to the hunt dir, a known bug's to the repo)."""
    return [[str(rank), str(f.signature), _kind(f), f.first_trial, str(f.first_trial_number), f"{f.first_elapsed:.1f}",
             str(f.trials), trigger_text(f.trigger), f.repro or "-", f.repro_rate or "-", _state(f)]
            for rank, f in enumerate(findings, 1)]


def _state(finding: Finding) -> str:
    return f"duplicate of {finding.duplicate_of}" if finding.state == "duplicate" else finding.state


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def _percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / max(whole, 1):.0f}%)"


def least_covered_pairs(coverage: Coverage, top: int = LEAST_COVERED_PAIRS) -> list[tuple[str, str, int, int]]:
    """The dimension pairs with the smallest share of their value pairs tried: (dim, dim, covered, total)."""
    known = {(k, json.dumps(v)) for k, values in coverage.dims.items() for v in values}
    tried: Counter = Counter()
    for a, b in coverage.pairs:
        if a in known and b in known and a[0] != b[0]:
            tried[(a[0], b[0])] += 1
    # Coverage keys its pairs by sorted items, so the first dimension is the smaller name.
    pairs = [(a, b, tried[(a, b)], len(coverage.dims[a]) * len(coverage.dims[b]))
             for a, b in itertools.combinations(sorted(coverage.dims), 2)]
    return sorted(pairs, key=lambda p: (p[2] / max(p[3], 1), p[0], p[1]))[:top]


def _engine(engine: dict) -> str:
    return " ".join(f"{k.removeprefix('engine.')}={json.dumps(v)}" for k, v in engine.items())


def oracle_levels(trials: list[TrialRow]) -> list[str]:
    """Per engine dtype, the largest difference each oracle saw on trials that passed: the clean
    levels the tolerances stand on, and the batch-composition noise floor (batch against alone)
    where vLLM promised no invariance."""
    levels: dict[tuple[str, str], float] = {}
    alone = Counter()
    for t in trials:
        if t.status != "ok":
            continue
        dtype = t.result.dtype or "?"
        for name, verdict in t.result.oracles.items():
            key = (dtype, name)
            levels[key] = max(levels.get(key, 0.0), verdict.max_diff)
            # Requests run again alone and compared bitwise: the batch-invariance oracle's noise floor.
            alone[(dtype, "requests")] += verdict.requests
            alone[(dtype, "identical")] += verdict.identical
    lines = []
    for dtype in sorted({d for d, _ in levels}):
        parts = [f"{name} {levels[(dtype, name)]:.2g}" for name in [o.name for o in trial_oracles()] if (dtype, name) in levels]
        if alone[(dtype, "requests")]:
            parts.append(f"batch vs alone bitwise identical {alone[(dtype, 'identical')]}/{alone[(dtype, 'requests')]} requests")
        lines.append(f"- {dtype}: max |diff| " + ", ".join(parts))
    return lines or ["- no passing trial"]


# TrialResult.phase_seconds' names (runner.run_trial) -> the report's.
PHASES = {"engine": "sampling", "reference": "reference scoring", "rescore": "re-scoring alone", "alone": "batch vs alone"}


def phase_totals(store: Store) -> dict[str, float]:
    """Seconds spent per phase: engine starts (one a group), each trial's phases summed, the rest of the
    trials' time (engine reset, the trace) as "other trial time"; largest first."""
    trials = [t for t in store.trials() if t.status != "rejected"]
    totals: Counter = Counter()
    for t in trials:
        totals.update({PHASES.get(k, k): v for k, v in t.result.phase_seconds.items()})
    totals["other trial time"] = max(sum(t.seconds for t in trials) - sum(totals.values()), 0.0)
    totals["engine start"] = sum(g.engine_seconds or 0.0 for g in store.groups())
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def time_lines(store: Store) -> list[str]:
    """Where the hunt's time went, each phase's seconds and share of the hunt clock."""
    clock = float(store.meta("elapsed_s", 0.0))
    trials = sum(t.status != "rejected" for t in store.trials())
    lines = [f"- {trials} trials in {clock:.0f} s of hunt clock ({3600 * trials / clock:.0f} an hour)" if clock else "- no time spent"]
    lines += [f"- {name}: {seconds:.0f} s ({seconds / clock:.0%})" for name, seconds in phase_totals(store).items() if clock]
    return lines + ["- the rest of the clock: engine processes starting (imports, model and reference loads), "
                    "validation, minimization and verification"]


def markdown(hunt_dir: Path, store: Store, coverage: Coverage, rows: list[list[str]], plots: list[Path],
             cfg: HuntRunConfig, wandb_line: Optional[str]) -> str:
    """HUNT_REPORT.md: what a person reads after a hunt."""
    trials, groups = store.trials(), store.groups()
    statuses = Counter(t.status for t in trials)
    counts = ", ".join(f"{s} {statuses.get(s, 0)}" for s in TRIAL_STATUSES)
    others = ", ".join(f"{s} {n}" for s, n in sorted(statuses.items()) if s not in TRIAL_STATUSES)
    out = [f"# Hunt report: {hunt_dir}", "",
           f"- budget: {cfg.hunt.budget_s:.0f} s; time spent: {float(store.meta('elapsed_s', 0.0)):.0f} s",
           f"- fault planted: {cfg.fault.name or 'none'}",
           f"- {len(groups)} engine groups, {len(trials)} trials: {counts}" + (f", {others}" if others else "")]
    if wandb_line:
        out.append(f"- {wandb_line}")
    out += ["", "## Findings, verified repros first, then by trials hit", ""]
    out.append(_table(FINDINGS_HEADER, rows) if rows else "No findings.")

    out += ["", "## What the oracles measured on passing trials", ""] + oracle_levels(trials)
    out += ["", "## Where the time went", ""] + time_lines(store)

    (values, pairs), (total_values, total_pairs) = coverage.covered(), coverage.totals()
    out += ["", "## Coverage", "", f"- values tried: {_percent(values, total_values)}",
            f"- pairs of values tried: {_percent(pairs, total_pairs)}", "", "Values never tried:", ""]
    untried = {dim: values for dim, values in coverage.untried().items() if values}
    out += [f"- `{dim}`: {', '.join(json.dumps(v) for v in values)}" for dim, values in untried.items()] or ["- none"]
    out += ["", "Dimension pairs least covered:", ""]
    out += [f"- `{a}` x `{b}`: {_percent(n, total)}" for a, b, n, total in least_covered_pairs(coverage)] or ["- none"]

    rejected = [g for g in groups if g.status == "rejected"]
    out += ["", "## Rejected configurations", "",
            "vLLM refused these engine configurations at start; they are invalid inputs, not bugs.", ""]
    learned = Learned.from_groups(groups)
    if learned.exclusions:
        out += ["Constraints between knobs learned from these refusals (hunt/constraints.py), excluded from later draws:", ""]
        out += learned.report_lines() + [f"- {len(learned.unexplained)} draw(s) rejected for other reasons (below)", ""]
    out += [f"- group {g.idx}: {_engine(g.engine)}: {g.message or '-'}" for g in rejected] or ["- none"]
    broken = [g for g in groups if g.status in BROKEN_GROUP_STATUSES]
    out += ["", "## Groups that hung, crashed or died", ""]
    out += [f"- group {g.idx} ({g.status}): {_engine(g.engine)}: {g.message or '-'}" for g in broken] or ["- none"]

    out += ["", "## Plots", ""]
    out += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(out) + "\n"


def plot_timeline(timeline: list, out_dir: Path) -> list[Path]:
    """findings_over_time.png and coverage_over_time.png; with no timeline, empty axes that say so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    elapsed, trials, findings, values, pairs = (list(column) for column in zip(*timeline)) if timeline else ([],) * 5
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.step(elapsed, findings, where="post", color="tab:red", label="findings")
    ax.set_xlabel("elapsed (s)")
    ax.set_ylabel("findings", color="tab:red")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    twin = ax.twinx()
    twin.plot(elapsed, trials, color="tab:blue", marker=".", label="trials")
    twin.set_ylabel("trials", color="tab:blue")
    paths.append(_save(fig, ax, timeline, out_dir / FINDINGS_PLOT, "findings and trials over the hunt"))

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(elapsed, values, marker=".", label="values")
    ax.plot(elapsed, pairs, marker=".", label="pairs of values")
    ax.set_xlabel("elapsed (s)")
    ax.set_ylabel("share of the space tried")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    paths.append(_save(fig, ax, timeline, out_dir / COVERAGE_PLOT, "coverage over the hunt"))
    return paths


def _save(fig, ax, timeline: list, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    if not timeline:
        ax.text(0.5, 0.5, "no engine group finished", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_wandb(hunt_dir: Path, store: Store, coverage: Coverage, timeline: list, rows: list[list[str]],
              plots: list[Path], cfg: HuntRunConfig, mode: str) -> str:
    """The hunt as a W&B run: the timeline as steps, then the findings table, plots and summary; returns its dir."""
    import wandb

    run = wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        job_type="hunt",
        name=f"hunt-{hunt_dir.name}",
        dir=str(hunt_dir),
        mode=mode,
        config={"hunt_dir": str(hunt_dir), "budget_s": cfg.hunt.budget_s, "seed": cfg.hunt.seed, "fault": cfg.fault.name},
        settings=wandb.Settings(silent=True, console="off"),
    )
    for step, (elapsed, trials, findings, values, pairs) in enumerate(timeline):
        run.log({"hunt/elapsed_s": elapsed, "hunt/trials": trials, "hunt/findings": findings,
                 "hunt/value_coverage": values, "hunt/pair_coverage": pairs}, step=step)
    payload: dict[str, Any] = {"hunt/findings_table": wandb.Table(columns=FINDINGS_HEADER, data=rows)}
    payload |= {f"hunt/plots/{p.stem}": wandb.Image(str(p)) for p in plots}
    run.log(payload, step=len(timeline))
    values, pairs = coverage.fractions()
    summary = {"trials": store.count_trials(), "findings": len(rows),
               "verified_findings": sum(row[FINDINGS_HEADER.index("state")] == "verified" for row in rows),
               "groups": len(store.groups()), "value_coverage": values, "pair_coverage": pairs,
               "elapsed_s": float(store.meta("elapsed_s", 0.0))}
    for key, value in summary.items():
        run.summary[key] = value
    wandb_dir = str(Path(run.dir).parent)
    run.finish()
    return wandb_dir
