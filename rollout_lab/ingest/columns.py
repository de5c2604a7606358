"""Structure versus magnitude across a column of one run: each value of the column (step, worker,
weight_version, num_cached_tokens, ...) stands for a run of a sweep, and the sweep analysis's own
tests and report (rollout_lab/analysis) judge whether the column changes where and how tokens fail
or only how much. Writes <run_dir>/by_<column>/SWEEP_REPORT.md, sweep_report.json and plots.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from rollout_lab.analysis.outcome import outcome_class
from rollout_lab.analysis.report import JSON_FILE, PLOT_DIR, REPORT_FILE, SweepReport, log_wandb, markdown, plot_moved
from rollout_lab.analysis.signature import RunSignature, token_frame, with_token_stats
from rollout_lab.analysis.verdict import variable_verdicts
from rollout_lab.ingest.writer import EXTRA_DIR
from rollout_lab.records import RecordsError, read_records, read_summary

# Per-request columns the split can take besides the token frame's own.
REQUEST_COLUMNS = ("num_cached_tokens", "num_preemptions", "prompt_index", "prompt_len", "reward")


def _column(run_dir: Path, frame: pd.DataFrame, column: str) -> pd.Series:
    """The column's value for every row of the analysis's token frame; RecordsError names a column the run lacks."""
    if column in frame:
        return frame[column]
    if column in REQUEST_COLUMNS:
        values = read_records(run_dir).select([column]).column(column).to_pandas()
        return values.set_axis(frame.index)
    extra = Path(run_dir) / EXTRA_DIR
    if extra.is_dir():
        table = pq.read_table(extra).to_pandas()
        if column in table:
            key = table["step"].astype(str) + "/" + table["worker"].astype(str) + "/" + table["request_id"]
            return frame["request"].map(dict(zip(key, table[column])))
    raise RecordsError(f"run dir {run_dir} has no column {column!r} to split by; it has {', '.join(frame.columns)}, "
                       f"{', '.join(REQUEST_COLUMNS)}" + (" and the export's weight_version" if extra.is_dir() else ""))


def split_report(run_dir: Path, column: str, seed: int = 0, wandb_mode: str = "disabled") -> Path:
    """Test structure vs magnitude across the values of `column`; returns the report's path."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    frame = token_frame(run_dir, summary.spike_threshold)
    values = _column(run_dir, frame, column)
    runs = []
    for value, tokens in frame.groupby(values.to_numpy(), sort=True):
        value = value.item() if hasattr(value, "item") else value
        signature = RunSignature(name=f"{column}={value}", run_dir=str(run_dir), status="ok", config={column: value},
                                 spike_threshold=summary.spike_threshold, tokens=tokens.reset_index(drop=True))
        signature.outcome = outcome_class("ok", int(tokens["spike"].sum()), False)
        runs.append(with_token_stats(signature))
    out_dir = run_dir / f"by_{column}"
    out_dir.mkdir(exist_ok=True)
    verdicts = variable_verdicts(runs, seed)
    report = SweepReport(str(out_dir), runs, [], [], {v.variable: v.values for v in verdicts}, verdicts)
    report.plots = plot_moved(report, out_dir / PLOT_DIR)
    (out_dir / REPORT_FILE).write_text(markdown(report))
    if wandb_mode != "disabled":
        report.wandb_dir = log_wandb(report, wandb_mode)
    (out_dir / JSON_FILE).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return out_dir / REPORT_FILE
