"""Spike thresholds calibrated from clean runs, per device, engine version and dtype.

    python -m rollout_lab.calibrate [--runs 5] [--dtypes float32 bfloat16] [--steps 1]

runs clean jobs (no fault, no pressure) and stores, for each dtype, the largest clean
|sampler - trainer| seen and the threshold derived from it, in <cache>/calibration.json. Rule:
threshold = 10 x the clean maximum, never below the dtype's calibration floor (tolerances.py),
so a clean run of the same setting raises no flag and a real corruption, which moves logprobs by
orders of magnitude more, still does. Runs then use the calibration matching their device, engine
and dtype (tolerances.threshold_for), and say so (summary.json: spike_threshold_source).
"""
from __future__ import annotations

import argparse
import json
import time

from rollout_lab.config import RunConfig
from rollout_lab.loop import run
from rollout_lab.tolerances import calibration_key, calibration_path, tolerance

MARGIN = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
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
        threshold = max(MARGIN * clean_max, tolerance(dtype).calibration_floor)
        table[calibration_key(dtype)] = {"clean_max": clean_max, "threshold": threshold, "runs": args.runs, "tokens": tokens}
        print(f"{calibration_key(dtype)}: clean max {clean_max:.3g} over {tokens} tokens -> threshold {threshold:.3g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
