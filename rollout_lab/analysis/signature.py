"""Failure signatures: one run dir in, a RunSignature out; a sweep dir in, its runs and broken runs out.

A signature says how a run failed: its outcome class (outcome.py: clean, silent mismatch, sync
mismatch, crash, or not run when vLLM refused its configuration), the crash signature if the
engine raised, how often and how badly tokens disagreed (spike rate, |difference| quantiles) and
where the spikes fell (position, step, sample, request, worker, KV block, state slot). It also
keeps the per-token table the sweep statistics need.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from rollout_lab.analysis.outcome import CLEAN, NOT_RUN, outcome_class, outcome_label, vllm_refusal
from rollout_lab.records import RecordsError, read_config, read_records, read_summary

from rollout_lab.shift_result import ShiftResult

# Per-token columns a spike can be located by (null columns are skipped: instrumentation off).
LOCATION_FEATURES = ("position", "step", "sample_index", "worker", "kv_block", "state_slot")
# The launcher writes this into a job dir when the job died without a result.
FAILURE_FILE = "failure.txt"
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
# Concentration: the share of a run's spikes held by this top fraction of its requests.
TOP_REQUEST_FRACTION = 0.1


class RunError(ValueError):
    """A run dir that cannot be analyzed; the message says why in one line."""


@dataclass
class SpikeSpread:
    """How a run's spikes spread along one location feature."""

    feature: str
    low: int
    median: float
    high: int
    distinct: int


@dataclass
class RunSignature:
    """How one run failed (or did not), read from its run dir."""

    name: str
    run_dir: str
    status: str
    # The resolved RunConfig, flattened to dotted keys (engine.kv_cache_memory_bytes, ...).
    config: dict[str, Any]
    spike_threshold: float
    crash_key: Optional[str] = None
    crash_message: Optional[str] = None
    crash_step: Optional[int] = None
    num_tokens: int = 0
    num_requests: int = 0
    num_spikes: int = 0
    spike_rate: float = 0.0
    abs_diff_quantiles: dict[str, float] = field(default_factory=dict)
    affected_request_share: float = 0.0
    first_spike_step: Optional[int] = None
    spike_concentration: float = 0.0
    where: list[SpikeSpread] = field(default_factory=list)
    # clean | silent mismatch | shifted | sync mismatch | crash | not run (outcome.py)
    outcome: str = CLEAN
    # The run's shift test (summary.json), None where it did not run.
    shift: Optional[ShiftResult] = None
    # Not run: vLLM's reason for refusing the configuration.
    refusal: Optional[str] = None
    # One row per token: request, the LOCATION_FEATURES, abs_diff, spike.
    tokens: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    @property
    def label(self) -> str:
        """The outcome as runs are compared: the class, with the crash site for a crash."""
        return outcome_label(self.outcome, self.crash_key)

    @property
    def failed(self) -> bool:
        """A crash, a weight-sync mismatch, or a token above the spike threshold."""
        return self.outcome not in (CLEAN, NOT_RUN)

    def to_dict(self) -> dict:
        """Everything but the token table, for JSON."""
        out = asdict(self)
        out.pop("tokens")
        return out | {"label": self.label}


@dataclass
class BrokenRun:
    """A planned or present run that could not be analyzed."""

    name: str
    run_dir: str
    problem: str


@dataclass
class SweepRuns:
    """A sweep dir read back: the runs with a result, those vLLM refused to start, the broken ones."""

    sweep_dir: str
    runs: list[RunSignature]
    not_run: list[RunSignature]
    broken: list[BrokenRun]
    # The sweep's command-line overrides (multirun.yaml), for the next sweep's command.
    overrides: list[str] = field(default_factory=list)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {dotted key: leaf value}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def token_frame(run_dir: Path, spike_threshold: float) -> pd.DataFrame:
    """The run's records as the columns the analysis uses; raises RunError on a bad records file."""
    if not (Path(run_dir) / "records").is_dir():  # an engine that never started wrote no step
        return pd.DataFrame()
    try:
        table = read_records(run_dir)
    except RecordsError as exc:
        raise RunError(str(exc)) from None
    frame = table.select(["step", "worker", "request_id", "sample_index", "position", "kv_block", "state_slot", "abs_diff"]).to_pandas()
    # Request ids restart with each engine and step: a request is (step, worker, id).
    frame.insert(0, "request", frame["step"].astype(str) + "/" + frame["worker"].astype(str) + "/" + frame["request_id"])
    frame = frame.drop(columns="request_id")
    frame["spike"] = frame["abs_diff"].to_numpy() > spike_threshold
    return frame


def run_signature(run_dir: Path, name: Optional[str] = None) -> RunSignature:
    """The failure signature of one run dir; raises RunError naming what is missing or corrupted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError("run dir missing")
    if (run_dir / FAILURE_FILE).exists():
        raise RunError(f"job failed: {(run_dir / FAILURE_FILE).read_text().strip().splitlines()[0]}")
    try:
        summary, cfg = read_summary(run_dir), read_config(run_dir)
    except RecordsError as exc:
        raise RunError(str(exc)) from None
    if summary.spike_threshold is None:
        raise RunError("summary.json has no spike_threshold")
    # A weight-sync mismatch carries a signature too, but its tokens are the evidence.
    crash = summary.crash if summary.status == "crash" else None
    refusal = vllm_refusal(cfg, crash) if crash is not None else None
    tokens = token_frame(run_dir, summary.spike_threshold)
    signature = RunSignature(
        name=name or run_dir.name,
        run_dir=str(run_dir),
        status=summary.status,
        config=flatten(asdict(cfg)),
        spike_threshold=summary.spike_threshold,
        crash_key=crash.key if crash is not None else None,
        crash_message=crash.message if crash is not None else None,
        crash_step=crash.step if crash is not None else None,
        refusal=refusal,
        tokens=tokens,
    )
    signature.shift = summary.shift
    shifted = summary.shift is not None and summary.shift.shifted
    signature.outcome = outcome_class(signature.status, int(tokens["spike"].sum()) if not tokens.empty else 0, refusal is not None, shifted)
    return with_token_stats(signature)


def with_token_stats(signature: RunSignature) -> RunSignature:
    """The signature with its spike rate, quantiles and spike locations computed from its token table."""
    tokens = signature.tokens
    if tokens.empty:
        return signature
    abs_diff = tokens["abs_diff"].to_numpy()
    spikes = tokens[tokens["spike"]]
    per_request = tokens.groupby("request")["spike"].sum()
    signature.num_tokens = len(tokens)
    signature.num_requests = len(per_request)
    signature.num_spikes = len(spikes)
    signature.spike_rate = len(spikes) / len(tokens)
    signature.abs_diff_quantiles = {k: float(np.quantile(abs_diff, q)) for k, q in QUANTILES.items()}
    signature.affected_request_share = float((per_request > 0).mean())
    if len(spikes):
        signature.first_spike_step = int(spikes["step"].min())
        top = max(1, int(np.ceil(TOP_REQUEST_FRACTION * len(per_request))))
        signature.spike_concentration = float(np.sort(per_request.to_numpy())[::-1][:top].sum() / len(spikes))
        for feature in LOCATION_FEATURES:
            values = spikes[feature].dropna().to_numpy()
            if values.size:
                signature.where.append(
                    SpikeSpread(feature, int(values.min()), float(np.median(values)), int(values.max()), int(np.unique(values).size))
                )
    return signature


def _multirun(sweep_dir: Path) -> tuple[list[str], list[str]]:
    """From multirun.yaml: (job dir names Hydra planned, the sweep's task overrides); ([], []) if it cannot tell."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return [], []
    try:
        hydra = OmegaConf.to_container(OmegaConf.load(path).hydra, resolve=False)
        task = [str(o) for o in hydra["overrides"]["task"]]
        if hydra["sweep"]["subdir"] != "${hydra.job.num}":
            return [], task
        params = [f"{k}={v}" for k, v in (hydra["sweeper"].get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides(params + task)
        batches = BasicSweeper.split_arguments(overrides, None)
    except Exception:  # a damaged multirun.yaml: fall back to the job dirs that exist
        return [], []
    return [str(i) for i in range(sum(len(batch) for batch in batches))], task


def _looks_like_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("summary.json", "config.json", ".hydra", "records", FAILURE_FILE))


def read_sweep(sweep_dir: Path) -> SweepRuns:
    """Every run of a sweep dir: planned ones (multirun.yaml) and present ones; refused and broken ones apart."""
    sweep_dir = Path(sweep_dir)
    planned, overrides = _multirun(sweep_dir)
    names = set(planned) | {p.name for p in sweep_dir.iterdir() if _looks_like_run(p)}
    runs, not_run, broken = [], [], []
    for name in sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n)):
        try:
            signature = run_signature(sweep_dir / name, name)
        except RunError as exc:
            broken.append(BrokenRun(name, str(sweep_dir / name), str(exc)))
            continue
        (not_run if signature.outcome == NOT_RUN else runs).append(signature)
    return SweepRuns(str(sweep_dir), runs, not_run, broken, overrides)
