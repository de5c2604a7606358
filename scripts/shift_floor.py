"""The smallest shift the shift test detects, per dtype, on the device this runs on (CPU or CUDA).

    python scripts/shift_floor.py --out shift_floor.json [--dtypes bfloat16 float32] [--budget-s 270]
        [--profile-runs 1 --profile-steps 2] [--clean-steps 2] [--clean-seeds 20] [--profile PATH] [--faults logit_noise=0.01,0.03]
        [key=value ...]   # RunConfig overrides for every run, e.g. engine.kv_cache_memory_bytes=268435456

Per dtype (engine in that dtype, trainer float32: the users' setting), in a private cache (the user's
calibration and profiles stay as they are): a clean profile (calibrate.clean_runs, or --profile), one
clean run of --clean-steps steps whose every step is tested against it as a run of its own and
--clean-seeds clean one-step jobs each judged by the loop against it (false positives), then each planted fault at rising scales, one 1-step run each through the lab's own loop
(its outcome is what a user gets), until a scale ends `shifted` naming the fault's condition or spikes
past the threshold. Run dirs go to runs/shift_floor/<time>/. Prints a table and writes the JSON to --out. Stops starting runs after --budget-s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Scales to try per dtype, smallest first: about the clean per-token |difference| down to well below it.
LADDERS = {
    "bfloat16": {"logit_noise": [0.01, 0.02, 0.04, 0.08], "kv_noise": [0.005, 0.01, 0.02, 0.04]},
    "float32": {"logit_noise": [1e-5, 3e-5, 1e-4, 3e-4], "kv_noise": [1e-5, 3e-5, 1e-4, 3e-4]},
}
KV_MIN_BLOCK = 16  # kv_noise writes blocks >= this: the condition it must be named by is a kv_block level from here up
FAULT_SEED = 7  # engine and prompt seed of the fault runs: not a profile seed (0, 1, ...) nor the clean run's
CLEAN_SEED = 1000  # the first seed of the clean runs (--clean-steps' run, then --clean-seeds' runs)


def right_condition(fault: str, head) -> bool:
    """Whether the named condition is where the fault acts: all tokens for logit_noise, high KV blocks for kv_noise."""
    if head is None:
        return False
    if fault == "kv_noise":
        return head.factor == "kv_block" and int(head.level.split("-")[0].rstrip("+")) >= KV_MIN_BLOCK
    return head.factor == "all"


def job(dtype: str, run_dir: Path, overrides: list[str], *extra: str):
    """The default job in `dtype` (trainer float32), one step, W&B off, with the given overrides."""
    from rollout_lab.calibrate import _with_overrides

    cfg = _with_overrides(["loop.steps=1", "logger.mode=disabled", *overrides, *extra])
    cfg.engine.dtype, cfg.trainer.dtype, cfg.run_dir = dtype, "float32", str(run_dir)
    return cfg


def fault_row(fault: str, scale: float, result) -> dict:
    head = result.shift.headline if result.shift is not None else None
    return {"fault": fault, "scale": scale, "status": result.status, "outcome": result.outcome,
            "max_abs_diff": result.abs_diff_max, "spike_threshold": result.spike_threshold,
            "condition": head.condition if head else None, "effect_A": head.effect if head else None,
            "p_adjusted": head.p_adjusted if head else None, "run_mean": head.run_mean if head else None,
            "reference_mean": head.reference_mean if head else None, "right_condition": right_condition(fault, head),
            "crash": result.crash.exception_type if result.crash is not None else None, "seconds": result.seconds}


def clean_seeds(dtype: str, args, work: Path, deadline: float) -> dict:
    """The false-positive rate as a user meets it: --clean-seeds clean one-step jobs (engine and prompt seed
    CLEAN_SEED, CLEAN_SEED + 1, ...), each run through the loop, whose outcome is judged against the profile."""
    from tqdm import tqdm

    from rollout_lab.loop import run

    rows = []
    seeds = args.clean_seed_list or range(CLEAN_SEED, CLEAN_SEED + args.clean_seeds)
    for seed in tqdm(seeds, desc=f"[{dtype}] clean seeds", unit="run"):
        if time.monotonic() > deadline:
            break
        result = run(job(dtype, work / f"{dtype}-clean-seed{seed}", args.overrides, f"model.name={args.model}",
                         f"engine.seed={seed}", f"workload.prompt_seed={seed}"))
        head = result.shift.headline if result.shift is not None else None
        rows.append({"seed": seed, "status": result.status, "outcome": result.outcome, "max_abs_diff": result.abs_diff_max,
                     "closest": head.sentence() if head else None, "seconds": result.seconds})
        print(f"[{dtype}] clean seed {seed}: {result.outcome}; {rows[-1]['closest']}", flush=True)
    clean = sum(r["outcome"] == "clean" for r in rows)
    print(f"[{dtype}] clean seeds: {clean} of {len(rows)} clean", flush=True)
    return {"runs": len(rows), "clean": clean, "rows": rows}


def measure(dtype: str, args, work: Path, deadline: float) -> dict:
    from rollout_lab.calibrate import clean_runs
    from rollout_lab.loop import run
    from rollout_lab.shift import profile_key, profile_path, read_profile, shift_frame, shift_test, write_profile

    out: dict = {"dtype": dtype, "faults": {}}
    if args.profile:
        profile = read_profile(args.profile)
    else:
        _, _, profile = clean_runs(dtype, args.profile_runs, args.profile_steps, args.model, "float32",
                                   [*args.overrides, "logger.mode=disabled"])
    path = write_profile(profile_path(profile_key(job(dtype, work, args.overrides, f"model.name={args.model}"))), profile)
    out["profile"] = {"key": profile.key, "tokens": len(profile.tokens), "sequences": int(profile.tokens["sequence"].nunique()),
                      "runs": profile.runs, "steps": profile.steps, "seconds": profile.seconds, "path": str(path)}
    print(f"[{dtype}] profile: {out['profile']['tokens']} tokens, {out['profile']['sequences']} sequences, {profile.seconds:.0f} s", flush=True)
    if args.clean_steps and time.monotonic() < deadline:
        cfg = job(dtype, work / f"{dtype}-clean", args.overrides, f"model.name={args.model}", f"loop.steps={args.clean_steps}",
                  f"engine.seed={CLEAN_SEED}", f"workload.prompt_seed={CLEAN_SEED}")
        result = run(cfg)
        frame = shift_frame(cfg.run_dir)
        steps = [shift_test(part, profile.tokens) for _, part in frame.groupby("step")]
        out["clean"] = {"status": result.status, "outcome": result.outcome, "steps": len(steps), "shifted_steps": sum(s.shifted for s in steps),
                        "closest": [s.headline.sentence() for s in steps], "max_abs_diff": result.abs_diff_max, "seconds": result.seconds}
        print(f"[{dtype}] clean: {out['clean']['shifted_steps']} of {len(steps)} steps shifted; run outcome {result.outcome}", flush=True)
    if (args.clean_seeds or args.clean_seed_list) and time.monotonic() < deadline:
        out["clean_seeds"] = clean_seeds(dtype, args, work, deadline)
    ladders = LADDERS[dtype]
    if args.faults is not None:  # `--faults` alone: no fault runs (the false-positive measurement only)
        ladders = {name: [float(v) for v in scales.split(",")] for name, _, scales in (f.partition("=") for f in args.faults)}
    for fault, scales in ladders.items():
        rows = out["faults"][fault] = []
        for scale in scales:
            if time.monotonic() > deadline:
                rows.append({"fault": fault, "scale": scale, "outcome": "not run (budget)"})
                continue
            extra = [f"fault.name={fault}", f"fault.params.scale={scale}", f"engine.seed={FAULT_SEED}", f"workload.prompt_seed={FAULT_SEED}"]
            if fault == "kv_noise":
                extra.append(f"fault.params.min_block={KV_MIN_BLOCK}")
            row = fault_row(fault, scale, run(job(dtype, work / f"{dtype}-{fault}-{scale}", args.overrides, f"model.name={args.model}", *extra)))
            rows.append(row)
            print(f"[{dtype}] {fault} {scale}: {row['outcome']}, max {row['max_abs_diff']:.3g}, {row['condition']} "
                  f"A {row['effect_A'] or 0:.3f} p {row['p_adjusted'] if row['p_adjusted'] is not None else float('nan'):.3g}", flush=True)
            if row["crash"] or row["outcome"] in ("silent mismatch", "sync mismatch") or (row["outcome"] == "shifted" and row["right_condition"]):
                break  # detected, or past what the shift test is for, or the fault cannot run here
        detected = [r["scale"] for r in rows if r.get("outcome") == "shifted" and r.get("right_condition")]
        out[f"smallest_{fault}"] = min(detected) if detected else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where the JSON goes")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=sorted(LADDERS))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--profile-runs", type=int, default=1)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--clean-steps", type=int, default=2, help="steps of the clean run tested step by step (0: none)")
    parser.add_argument("--clean-seeds", type=int, default=0, help="clean one-step jobs at seeds 1000, 1001, ..., "
                        "each judged by the loop against the profile (the false-positive rate; 0: none)")
    parser.add_argument("--clean-seed-list", type=int, nargs="+", help="these seeds instead (a run lost to memory, say)")
    parser.add_argument("--profile", help="an existing profile file to test against (one dtype) instead of measuring one")
    parser.add_argument("--faults", nargs="*", help="ladders replacing the built-in ones, e.g. logit_noise=0.02,0.04 kv_noise=0.01")
    parser.add_argument("--budget-s", type=float, default=270, help="start no run after this many seconds")
    parser.add_argument("overrides", nargs="*", help="RunConfig keys for every run")
    args = parser.parse_args()
    if args.profile and len(args.dtypes) != 1:
        sys.exit("shift_floor: --profile is one dtype's profile: pass one --dtypes")
    from rollout_lab.models import cache_dir
    from rollout_lab.tolerances import device_name, engine_version

    models, started = cache_dir() / "models", time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shift_floor_") as tmp:
        cache, work = Path(tmp) / "cache", Path("runs/shift_floor") / time.strftime("%Y%m%d-%H%M%S")
        cache.mkdir()
        (cache / "models").symlink_to(models)
        os.environ["ROLLOUT_LAB_CACHE"] = str(cache)  # this script's profiles reach no other run; its run dirs stay
        report = {"device": device_name(), "engine": engine_version(), "model": args.model, "overrides": args.overrides,
                  "dtypes": [measure(d, args, work, started + args.budget_s) for d in args.dtypes],
                  "seconds": time.monotonic() - started}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nshift floor on {report['device']} ({report['engine']}, {args.model}), {report['seconds']:.0f} s")
    print(f"{'dtype':9} {'fault':12} {'scale':>8} {'outcome':16} {'max|diff|':>9} {'condition':18} {'A':>6} {'p (Holm)':>8}")
    for entry in report["dtypes"]:
        for fault, rows in entry["faults"].items():
            for r in rows:
                print(f"{entry['dtype']:9} {fault:12} {r['scale']:>8.3g} {r['outcome']:16} {r.get('max_abs_diff') or 0:>9.3g} "
                      f"{str(r.get('condition')):18} {r.get('effect_A') or 0:>6.3f} {r.get('p_adjusted') or 1:>8.3g}")
            print(f"{entry['dtype']:9} {fault:12} smallest detected: {entry.get('smallest_' + fault)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
