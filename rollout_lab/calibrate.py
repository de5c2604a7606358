"""Spike thresholds calibrated from clean runs, per device, engine version and dtype.

    python -m rollout_lab.calibrate [--runs 5] [--dtypes float32 bfloat16] [--steps 1] [key=value ...]

runs clean jobs (no fault, no pressure) and stores, for each dtype, the largest clean
|sampler - trainer| seen and the threshold derived from it, in <cache>/calibration.json. Rule:
threshold = 10 x the clean maximum, never below the dtype's calibration floor (tolerances.py),
so a clean run of the same setting raises no flag and a real corruption, which moves logprobs by
orders of magnitude more, still does. Runs then use the calibration matching their device, engine
and dtype (tolerances.threshold_for), and say so (summary.json: spike_threshold_source).

The same clean runs make the shift profile of the model, dtype and engine release: every token's
|difference| with the conditions it was sampled in, in <cache>/shift_profiles/ (rollout_lab/shift.py,
keyed by shift.profile_key), with the runs, steps and seconds it took; every later run of that key is
tested against it (docs/shift.md).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Optional

import pandas as pd

from rollout_lab.config import RunConfig
from rollout_lab.loop import run
from rollout_lab.shift import ShiftProfile, profile_key, profile_path, shift_frame, write_profile
from rollout_lab.tolerances import calibration_key, calibration_path, tolerance

MARGIN = 10.0


def _with_overrides(overrides: list[str]) -> RunConfig:
    """A RunConfig with dotted key=value overrides; a bad key or value exits with one line naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise SystemExit(f"rollout_lab.calibrate: bad override ({exc})".splitlines()[0]) from None


def clean_runs(dtype: str, runs: int, steps: int, model: str, trainer_dtype: Optional[str], overrides: list[str],
               first_seed: int = 0) -> tuple[float, int, ShiftProfile]:
    """`runs` clean jobs of `steps` steps (engine and prompt seeds first_seed, first_seed + 1, ...): their largest
    |difference|, their token count and their shift profile. A run that does not end `ok` exits naming it."""
    clean_max, tokens, frames, started = 0.0, 0, [], time.perf_counter()
    for index in range(first_seed, first_seed + runs):
        cfg = _with_overrides(overrides)
        cfg.run_name, cfg.run_dir = f"calibrate-{dtype}-{index}", f"runs/calibrate/{time.strftime('%Y%m%d-%H%M%S')}-{dtype}-{index}"
        cfg.model.name, cfg.loop.steps = model, steps
        cfg.engine.dtype, cfg.trainer.dtype = dtype, trainer_dtype or dtype
        cfg.engine.seed = cfg.workload.prompt_seed = index
        cfg.loop.check_weight_sync = False
        result = run(cfg)
        if result.status != "ok":
            raise SystemExit(f"calibration run {cfg.run_dir} ended with status {result.status}")
        clean_max, tokens = max(clean_max, result.abs_diff_max), tokens + result.num_tokens
        frames.append(shift_frame(cfg.run_dir, run_label=f"{index}/"))
    profile = ShiftProfile(profile_key(cfg), runs, steps, time.perf_counter() - started, pd.concat(frames, ignore_index=True))
    return clean_max, tokens, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--trainer-dtype", help="the trainer's dtype (default: each engine dtype's own); the users' "
                        "bfloat16 engine beside a float32 trainer is engine bfloat16 --trainer-dtype float32")
    parser.add_argument("overrides", nargs="*", help="RunConfig keys for every clean run, e.g. engine.kv_cache_memory_bytes=268435456")
    args = parser.parse_args()
    path = calibration_path()
    table = json.loads(path.read_text()) if path.exists() else {}
    for dtype in args.dtypes:
        clean_max, tokens, profile = clean_runs(dtype, args.runs, args.steps, args.model, args.trainer_dtype, args.overrides)
        threshold = max(MARGIN * clean_max, tolerance(dtype).calibration_floor)
        table[calibration_key(dtype)] = {"clean_max": clean_max, "threshold": threshold, "runs": args.runs, "tokens": tokens}
        print(f"{calibration_key(dtype)}: clean max {clean_max:.3g} over {tokens} tokens -> threshold {threshold:.3g}")
        written = write_profile(profile_path(profile.key), profile)
        print(f"shift profile [{profile.key}]: {len(profile.tokens)} tokens, {profile.seconds:.0f} s -> {written}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
