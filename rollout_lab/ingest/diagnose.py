"""Pipeline diagnoses: mismatch a user's pipeline, not the engine, can cause, each named with its evidence.

The diagnoses (one interface and its registry) are diagnoses.py's; this runs them. The steps stream by one records file at a time. Flagged tokens
(|sampler - trainer| above the run's spike threshold) that no diagnosis explains are what remains
for the engine; the report (<run_dir>/DIAGNOSIS.md, diagnosis.json) states them above the trainer's
own noise floor (rollout_lab/noise_floor.py) where one was measured. Works on any run dir.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from rollout_lab.ingest.diagnoses import DIAGNOSES, Context, Finding
from rollout_lab.ingest.record import IngestRecord
from rollout_lab.noise_floor import NoiseFloor, above_floor
from rollout_lab.records import RecordsError, read_summary

REPORT_FILE = "DIAGNOSIS.md"
JSON_FILE = "diagnosis.json"


@dataclass
class DiagnosisReport:
    """A run's diagnoses, and the flagged tokens none explains: what remains for the engine."""

    run_dir: str
    threshold: float
    floor: Optional[dict]
    findings: list[Finding]
    tokens: int
    flagged: int
    remaining: int
    remaining_requests: int
    remaining_steps: list[int]
    remaining_max: float
    abs_diff_max: float
    against_floor: str
    ingest: Optional[dict] = None

    def write(self, run_dir: Path) -> None:
        (Path(run_dir) / JSON_FILE).write_text(json.dumps(asdict(self), indent=2, default=str))
        (Path(run_dir) / REPORT_FILE).write_text(markdown(self))


def _steps(run_dir: Path):
    """(step, its tokens ordered by request and position), one records file at a time."""
    columns = ["step", "worker", "request_id", "position", "token_id", "sampler_logprob", "trainer_logprob", "abs_diff"]
    paths = sorted((run_dir / "records").glob("step_*.parquet"))
    if not paths:
        raise RecordsError(f"run dir {run_dir} has no records/step_*.parquet")
    for path in paths:
        frame = pq.read_table(path, columns=columns).to_pandas().sort_values(["worker", "request_id", "position"], ignore_index=True)
        yield int(path.stem.split("_")[1]), frame


def diagnose(run_dir: Path, floor: Optional[NoiseFloor] = None) -> DiagnosisReport:
    """Run every diagnosis over the run's steps; write DIAGNOSIS.md and diagnosis.json; return the report.

    Two passes: the first decides which diagnoses hold (a pattern is a property of the whole run), the
    second takes the tokens those explain out of what remains for the engine."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    floor = floor or NoiseFloor.read(run_dir)
    context = Context(run_dir, summary.spike_threshold or 0.0, floor)
    diagnoses = [cls(context) for cls in DIAGNOSES]
    for step, frame in _steps(run_dir):
        for d in diagnoses:
            d.observe(step, frame)
    findings = [f for f in (d.finding() for d in diagnoses) if f is not None]
    held = [cls(context) for cls in DIAGNOSES if cls.name in {f.name for f in findings}]
    tokens = flagged = remaining = 0
    remaining_requests, remaining_steps, remaining_max, worst = set(), [], 0.0, 0.0
    for step, frame in _steps(run_dir):
        explained = np.zeros(len(frame), dtype=bool)
        for d in held:
            explained |= d.observe(step, frame)
        diff = frame["abs_diff"].to_numpy()
        over = diff > context.threshold
        left = over & ~explained
        tokens += len(frame)
        flagged += int(over.sum())
        remaining += int(left.sum())
        worst = max(worst, float(np.nanmax(diff)) if len(diff) else 0.0)
        if left.any():
            remaining_steps.append(step)
            remaining_max = max(remaining_max, float(diff[left].max()))
            remaining_requests |= {f"{step}/{w}/{r}" for w, r in zip(frame["worker"][left], frame["request_id"][left])}
    ingest = IngestRecord.read(run_dir)
    report = DiagnosisReport(str(run_dir), context.threshold, asdict(floor) if floor else None, findings, tokens, flagged, remaining,
                             len(remaining_requests), remaining_steps, remaining_max, worst,
                             above_floor(remaining_max, floor) if remaining else "no flagged token is left for the engine",
                             asdict(ingest) if ingest else None)
    report.write(run_dir)
    return report


def markdown(report: DiagnosisReport) -> str:
    """DIAGNOSIS.md: the sides' sources, the pipeline diagnoses with evidence, then what remains for the engine."""
    out = [f"# Diagnosis: {report.run_dir}", ""]
    if report.ingest:
        i = report.ingest
        out += [f"Ingested from a **{i['format']}** export ({i['source']}): {i['sequences']} sequences, {i['tokens']} tokens, "
                f"steps {i['steps'][0]}..{i['steps'][-1]}; model `{i['model']}`.", "",
                f"- sampler logprobs: {i['sampler_side']}", f"- trainer logprobs: {i['trainer_side']}"]
        out += [f"- {column}: {what}" for column, what in i["missing"].items()] + [""]
    floor = report.floor
    out.append(f"{report.flagged} of {report.tokens} tokens above the spike threshold {report.threshold:g}; "
               + (f"the trainer's own noise floor: max {floor['abs_diff_max']:.3g}, p99 {floor['abs_diff_p99']:.3g} "
                  f"({floor['variant']}, {floor['dtype']}, {floor['tokens']} tokens)." if floor else "no noise floor measured."))
    out += ["", "## Pipeline diagnoses (not the engine)", ""]
    if not report.findings:
        out += ["None: no named pipeline fault matches this run.", ""]
    for f in report.findings:
        out += [f"### `{f.name}`: {f.title}", "", f"Explains {f.tokens} flagged tokens.", ""] + [f"- {e}" for e in f.evidence] + [""]
    out += ["## What remains for the engine", ""]
    if report.remaining:
        out += [f"{report.remaining} flagged tokens on {report.remaining_requests} requests (steps "
                f"{', '.join(map(str, report.remaining_steps))}) that no pipeline diagnosis explains: {report.against_floor}.", "",
                f"Replay and shrink them on vLLM: `python -m rollout_lab.minimize {report.run_dir}` (for an ingested run the "
                "engine comes from `--engine-config`)."]
    else:
        out.append("Nothing: " + ("every flagged token is explained above." if report.flagged else "no token is flagged."))
    return "\n".join(out) + "\n"


def print_diagnoses(report: DiagnosisReport) -> None:
    """The diagnoses and the engine's remainder on the console."""
    from rich.console import Console

    console = Console(soft_wrap=True, highlight=False)
    for f in report.findings:
        console.print(f"[yellow]diagnosis {f.name}[/]: {f.title}: explains {f.tokens} flagged tokens", markup=True)
        for e in f.evidence:
            console.print(f"  {e}", markup=False)
    if not report.findings:
        console.print("diagnoses: none of the named pipeline faults matches")
    colour = "red" if report.remaining else "green"
    console.print(f"[{colour}]for the engine[/]: {report.remaining} flagged tokens on {report.remaining_requests} requests; "
                  f"{report.against_floor}")
    console.print(f"report: {Path(report.run_dir) / REPORT_FILE}")
