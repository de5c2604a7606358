"""The trainer against itself: how far its own logprobs move when only the batching changes.

`python -m rollout_lab.noise_floor <run_dir>` scores a sample of the run's sequences (ours or
ingested) twice with the run's trainer model in the trainer's dtype, one sequence per forward and
then `--batch` sequences per padded forward (or, with --against-dtype, in another dtype), and writes <run_dir>/noise_floor.json. A sampler-trainer
difference within that floor is no evidence against the engine: every verdict is stated above it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from rollout_lab.records import RecordsError, read_config, read_requests, read_summary

FLOOR_FILE = "noise_floor.json"
FLOOR_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class NoiseFloor:
    """|trainer - the same trainer| per token over `tokens` tokens of `sequences` sequences."""

    model: str
    dtype: str
    # What changed between the two scorings.
    variant: str
    sequences: int
    tokens: int
    abs_diff_p50: float
    abs_diff_p99: float
    abs_diff_max: float
    version: int = FLOOR_VERSION

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / FLOOR_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, run_dir: Path) -> Optional["NoiseFloor"]:
        """The run's measured floor, None if none was measured; RecordsError for a bad file."""
        path = Path(run_dir) / FLOOR_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("version") != FLOOR_VERSION:
                raise RecordsError(f"{path} has version {data.get('version')!r}, expected {FLOOR_VERSION}")
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise RecordsError(f"{path} is corrupted ({exc})".splitlines()[0]) from None

    def describe(self) -> str:
        return (f"the trainer against itself ({self.model}, {self.dtype}, {self.variant}, {self.tokens} tokens of "
                f"{self.sequences} sequences): max |diff| {self.abs_diff_max:.3g}, p99 {self.abs_diff_p99:.3g}")


def run_sequences(run_dir: Path, limit: int) -> list[tuple[list[int], list[int]]]:
    """Up to `limit` (prompt, completion) pairs of a run, from its requests and records, first steps first."""
    run_dir = Path(run_dir)
    out: list[tuple[list[int], list[int]]] = []
    for path in sorted((run_dir / "records").glob("step_*.parquet")):
        step = int(path.stem.split("_")[1])
        prompts = {(r.worker, r.request_id): r.prompt_token_ids for r in read_requests(run_dir, step)}
        frame = pq.read_table(path, columns=["worker", "request_id", "position", "token_id"]).to_pandas()
        for (worker, request_id), tokens in frame.sort_values("position").groupby(["worker", "request_id"], sort=False):
            out.append((prompts[(worker, request_id)], tokens["token_id"].tolist()))
            if len(out) >= limit:
                return out
    return out


def _load(model_name: str, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from rollout_lab.models import resolve_model
    from rollout_lab.trainer import resolve_device

    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_name), dtype=getattr(torch, dtype))
    return model.to(resolve_device(device)).eval()


def measure(run_dir: Path, sequences: int = 32, batch: int = 8, dtype: Optional[str] = None,
            other_dtype: Optional[str] = None) -> NoiseFloor:
    """Score `sequences` of the run in the trainer's dtype one per forward, then `batch` per forward (or, with
    other_dtype, one per forward in that dtype); write the floor to the run dir and return it."""
    from rollout_lab.reference import reference_logprobs

    cfg = read_config(run_dir)
    dtype = dtype or cfg.trainer.dtype
    pairs = run_sequences(run_dir, sequences)
    if not pairs:
        raise RecordsError(f"run dir {run_dir} has no token to score")
    model = _load(cfg.model.name, dtype, cfg.trainer.device)
    # batch_tokens=1 puts every sequence in a forward of its own; batch x the longest fits `batch` of them.
    alone = reference_logprobs(model, pairs, batch_tokens=1)
    if other_dtype is None:
        variant = f"1 vs {batch} sequences per padded forward"
        other = reference_logprobs(model, pairs, batch_tokens=batch * max(len(p) + len(c) for p, c in pairs))
    else:
        variant = f"{dtype} vs {other_dtype}, 1 sequence per forward"
        other = reference_logprobs(_load(cfg.model.name, other_dtype, cfg.trainer.device), pairs, batch_tokens=1)
    diff = np.abs(np.concatenate([np.asarray(a) - np.asarray(b) for a, b in zip(alone, other)]))
    floor = NoiseFloor(model=cfg.model.name, dtype=dtype, variant=variant, sequences=len(pairs), tokens=int(diff.size),
                       abs_diff_p50=float(np.quantile(diff, 0.5)), abs_diff_p99=float(np.quantile(diff, 0.99)),
                       abs_diff_max=float(diff.max()))
    floor.write(run_dir)
    return floor


def above_floor(abs_diff_max: float, floor: Optional[NoiseFloor]) -> str:
    """The run's worst mismatch stated against the trainer's own floor (or against zero when none was measured)."""
    if floor is None:
        return f"max |sampler - trainer| {abs_diff_max:.3g} (no noise floor measured: `python -m rollout_lab.noise_floor <run_dir>`)"
    excess = abs_diff_max - floor.abs_diff_max
    if excess <= 0:
        return f"max |sampler - trainer| {abs_diff_max:.3g} is within the trainer's own floor {floor.abs_diff_max:.3g}"
    if floor.abs_diff_max == 0.0:
        return (f"max |sampler - trainer| {abs_diff_max:.3g}, all of it above the trainer's own floor: the trainer is bitwise "
                f"stable against itself ({floor.variant})")
    return (f"max |sampler - trainer| {abs_diff_max:.3g} is {excess:.3g} above the trainer's own floor {floor.abs_diff_max:.3g} "
            f"({abs_diff_max / floor.abs_diff_max:.3g}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollout_lab.noise_floor", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run dir, the lab's own or ingested")
    parser.add_argument("--sequences", type=int, default=32, help="sequences to score (default 32)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward of the second scoring (default 8)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: the run's trainer.dtype")
    parser.add_argument("--against-dtype", choices=DTYPES, help="compare with this dtype instead of another batch size")
    args = parser.parse_args(argv)
    try:
        floor = measure(args.run_dir, args.sequences, args.batch, args.dtype, args.against_dtype)
        summary = read_summary(args.run_dir)
    except RecordsError as exc:
        print(f"rollout_lab.noise_floor: {exc}", file=sys.stderr)
        return 2
    print(floor.describe())
    print(above_floor(summary.abs_diff_max, floor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
