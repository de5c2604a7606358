"""Bounded memory: write a generic-schema export of about --gb GB and ingest it in a child process,
printing the ingest's peak RSS and throughput (docs/your_run.md#bounded-memory).

    PYTHONPATH=. .venv/bin/python scripts/bench_ingest.py --gb 1 --out /tmp/bench_ingest

Sequences are synthetic (random ids of llama-tiny's vocabulary, both logprob sides given), so
the ingest does no model work: what is measured is reading, converting and writing the run dir.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rollout_lab.ingest.sequence import ExportedSequence, to_dict


def write_export(path: Path, target_bytes: int, steps: int, prompt_len: int, completion_len: int, seed: int = 0,
                 distinct: int = 256) -> tuple[int, int]:
    """A JSONL export of about target_bytes, spread evenly over `steps`; returns (sequences, tokens).

    `distinct` sequences are serialized once and written again under each step and request id:
    json.dumps of the floats would otherwise take longer than the ingest being measured."""
    import json

    rng = np.random.default_rng(seed)
    bodies = [json.dumps(to_dict(_sequence(rng, 0, 0, prompt_len, completion_len)))[1:] for _ in range(distinct)]
    # Every body starts with schema_version and step: the step and request id are swapped in per line.
    per_line = len(bodies[0]) + 32
    total = max(steps, target_bytes // per_line)
    with path.open("w") as f:
        for i in range(total):
            body = bodies[i % distinct].replace('"step": 0,', f'"step": {i * steps // total},', 1)
            f.write("{" + body.replace('"request_id": "0"', f'"request_id": "{i}"', 1) + "\n")
    return total, total * completion_len


def _sequence(rng, step: int, index: int, prompt_len: int, completion_len: int) -> ExportedSequence:
    sampler = -rng.exponential(2.0, completion_len)
    trainer = sampler + rng.normal(0, 1e-5, completion_len)
    return ExportedSequence(step=step, prompt_token_ids=rng.integers(3, 49000, prompt_len).tolist(),
                            token_ids=rng.integers(3, 49000, completion_len).tolist(), sampler_logprobs=sampler.round(6).tolist(),
                            trainer_logprobs=trainer.round(6).tolist(), reward=float(rng.random()), request_id=str(index))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--completion-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_ingest"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    export = args.out / "export.jsonl"
    started = time.perf_counter()
    sequences, tokens = write_export(export, int(args.gb * 1e9), args.steps, args.prompt_len, args.completion_len)
    size = export.stat().st_size
    print(f"wrote {export}: {size / 1e9:.2f} GB, {sequences} sequences, {tokens} tokens, {args.steps} steps "
          f"in {time.perf_counter() - started:.0f} s")
    command = [sys.executable, "-m", "rollout_lab.ingest", "generic", str(export), "--model", "llama-tiny", "--out",
               str(args.out / "run"), "--noise-floor-sequences", "0", "--wandb", "offline"]
    started = time.perf_counter()
    done = subprocess.run(command, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    # ru_maxrss of the children: the ingest process, the only child run.
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"ingest: {seconds:.0f} s, {size / 1e6 / seconds:.1f} MB/s, {tokens / seconds:,.0f} tokens/s; peak RSS {peak_mb:.0f} MB "
          f"for a {size / 1e6:.0f} MB export")
    print("\n".join(done.stdout.splitlines()[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
