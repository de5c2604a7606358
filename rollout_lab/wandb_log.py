"""Metrics out: a local metrics.jsonl in the run dir, and a W&B run (offline by default).

Offline W&B runs are binary `.wandb` files (LevelDB log framing around protobuf Records);
`read_offline_run` parses them back so tests and scripts can check what W&B received.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rollout_lab.config import RunConfig


def start_run(cfg: RunConfig, run_dir: Path, run_id: str, config_dict: dict, job_type: Optional[str] = None):
    """A W&B run as cfg.logger says (None when disabled), its files under run_dir."""
    if cfg.logger.mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        name=run_id,
        id=run_id,
        dir=str(run_dir),
        mode=cfg.logger.mode,
        config=config_dict,
        job_type=job_type,
        settings=wandb.Settings(silent=True, console="off"),
    )


@dataclass
class LayerCurves:
    """One localized token's divergence by layer: one series per kind of capture point (attention, MLP, ...)."""

    title: str
    series: list[str]
    layers: list[list[int]]
    values: list[list[float]]


def log_layer_curves(cfg: RunConfig, out_dir: Path, source_run_id: str, curves: list[LayerCurves],
                     summary: dict[str, str]) -> Optional[str]:
    """A localization's W&B run (id <source run>-localize): a divergence-by-layer chart per token and the
    summary lines; returns its directory."""
    run = start_run(cfg, out_dir, f"{source_run_id}-localize", {"source_run": source_run_id}, job_type="localize")
    if run is None:
        return None
    import wandb

    for curve in curves:
        chart = wandb.plot.line_series(xs=curve.layers, ys=curve.values, keys=curve.series, title=curve.title, xname="layer")
        run.log({f"localize/{curve.title}": chart})
    for key, value in summary.items():
        run.summary[key] = value
    wandb_dir = run.dir
    run.finish()
    return str(Path(wandb_dir).parent)


class RunLogger:
    """Writes one JSON line per step to metrics.jsonl and the same metrics to W&B."""

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str, config_dict: dict):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.worst_tokens = cfg.logger.worst_tokens
        self.wandb_run = start_run(cfg, self.run_dir, run_id, config_dict)

    def log_step(self, step: int, metrics: dict[str, float], abs_diff: np.ndarray, worst_rows: list[dict]) -> None:
        """Metrics, a histogram of per-token |differences| and a table of the worst tokens."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is None:
            return
        import wandb

        payload: dict[str, Any] = {f"mismatch/{k}": v for k, v in metrics.items()}
        if abs_diff.size:
            payload["mismatch/abs_diff_log10_hist"] = wandb.Histogram(np.log10(abs_diff + 1e-12))
        if worst_rows:
            columns = list(worst_rows[0])
            payload["mismatch/worst_tokens"] = wandb.Table(
                columns=columns, data=[[row[c] for c in columns] for row in worst_rows]
            )
        self.wandb_run.log(payload, step=step)

    def finish(self, summary: dict, shift=None) -> Optional[str]:
        """Write the run summary (and the shift test's table, a rollout_lab.shift.ShiftResult) to W&B and close
        it; returns the W&B run directory."""
        if self.wandb_run is None:
            return None
        if shift is not None and shift.tests:
            import wandb

            columns, rows = shift.table_rows()
            self.wandb_run.log({"shift/conditions": wandb.Table(columns=columns, data=rows)})
            summary = summary | shift.wandb_summary()
        for key, value in summary.items():
            self.wandb_run.summary[key] = value
        wandb_dir = self.wandb_run.dir
        self.wandb_run.finish()
        return str(Path(wandb_dir).parent)


_BLOCK = 32768
_RECORD_HEADER = 7  # crc32 (4) + length (2) + type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path):
    """Yield the raw protobuf payloads of a .wandb file."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    offset, pending = 7, b""
    while offset + _RECORD_HEADER <= len(data):
        block_left = _BLOCK - offset % _BLOCK
        if block_left < _RECORD_HEADER:
            offset += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + _RECORD_HEADER])
        payload = data[offset + _RECORD_HEADER : offset + _RECORD_HEADER + length]
        offset += _RECORD_HEADER + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pending + payload
            pending = b""
        elif kind == 0 and length == 0:
            break


def read_offline_run(wandb_run_dir: Path) -> dict[str, Any]:
    """History rows, summary and config that an offline W&B run recorded."""
    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(wandb_run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {wandb_run_dir}")
    history, summary, config = [], {}, {}
    for payload in _records(files[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "run":
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
    return {"history": history, "summary": summary, "config": config}
