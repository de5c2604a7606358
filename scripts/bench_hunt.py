"""The hunt's throughput and what it finds, before and after a change, measured back to back on one machine.

    python scripts/bench_hunt.py draws [--space default] [--draws 60]
    python scripts/bench_hunt.py trials [--trials 4]
    python scripts/bench_hunt.py hunt [--base 4658f49] [--after HEAD] [--budget-s 600] [--out DIR] [hunt overrides ...]

`draws`: how many engine configurations the planner draws before one passes vLLM's config validation
(`engine.validate`, no engine started), without and with the constraints learned from vLLM's refusals
(hunt/constraints.py); the same seed, planner and coverage bookkeeping as a hunt's, every draw of a
group counted. `trials`: the oracles' seconds per trial before and after on one engine (hunt=smoke's
configuration), each workload once each way, interleaved. `hunt`: `python -m rollout_lab.hunt hunt.minimize=false` for --budget-s, first in a
worktree of --base, then in one of --after (HEAD; both made under --out, removed by hand with
`git worktree remove`), each alone, and the same again with
`fault=stale_state` (the planted mismatch) in the smoke space (--fault-overrides); from each hunt.db: trials an hour (trials vLLM did not
refuse, over the hunt's clock), where the trials' time went (the runner's phase_seconds, summed), and
the hunt seconds to each known CPU crash and to the planted mismatch. The machine is shared: compare
the two columns of one run, never a rate across runs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The CPU bugs a default hunt finds (repro/<name>/signature.txt) and the planted fault's finding.
PLANTED = ("stale_state", "mismatch/reference:smollm2:float32:preempted")


def draws(space_name: str, count: int, seed: int) -> None:
    """Validated draws out of `count` planner draws, without and with learned constraints."""
    from hydra import compose, initialize_config_dir

    from rollout_lab import engine
    from rollout_lab.hunt.constraints import Learned
    from rollout_lab.hunt.trace import valid_workload
    from rollout_lab.hunt.search import Coverage, Planner
    from rollout_lab.hunt.space import Space, engine_args, register, with_pressure
    from rollout_lab.models import resolve_model

    register()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("hunt_run", overrides=[f"hunt={space_name}", f"hunt.seed={seed}"])
    space = Space.from_config(cfg.hunt.space)
    for learn in (False, True):
        planner, coverage, learned = Planner(space, seed, cfg.hunt.candidates, cfg.hunt.exploit, valid_workload), \
            Coverage(space.dims()), Learned()
        rejected, reasons = set(), Counter()
        started = 0
        for index in range(count):
            group = planner.next_group(index, coverage, cfg.hunt.workloads_per_engine, (), rejected,
                                       (lambda p: learned.allows(with_pressure(p))) if learn else (lambda p: True))
            point = with_pressure(group.engine)
            complaint = engine.validate(resolve_model(point["model"]), engine_args(point))
            if complaint is None:
                started += 1
                for workload in group.workloads:
                    coverage.record(point | workload)
                continue
            rejected.add(group.key)
            exclusion = learned.record(index, point, complaint)
            reasons[exclusion.describe() if exclusion else complaint[:90]] += 1
        print(f"{'with' if learn else 'without'} learned constraints: {started}/{count} draws pass vLLM's validation")
        for reason, n in reasons.most_common():
            print(f"  {n} rejected: {reason}")


def trials(count: int, seed: int, out: Path) -> None:
    """The oracles' cost per trial as they were (every ordinary sequence re-scored, the noise floor
    measured every trial) and as they are, on one engine of hunt=smoke's configuration: each of
    `count` default-space workloads run twice, once each way, which one first alternating (the
    engine's first trial pays its warm-up)."""
    from hydra import compose, initialize_config_dir

    from rollout_lab.hunt import runner
    from rollout_lab.hunt.protocol import TrialFinished, read_events
    from rollout_lab.hunt.runner import GroupSpec, run_group
    from rollout_lab.hunt.trace import valid_workload
    from rollout_lab.hunt.search import Coverage, Planner
    from rollout_lab.hunt.space import OracleConfig, Space, register
    from rollout_lab.models import resolve_model

    register()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        smoke = compose("hunt_run", overrides=["hunt=smoke"]).hunt.space
        default = Space.from_config(compose("hunt_run").hunt.space)
    engine = {"model": "smollm2", **{f"engine.{k}": v[0] for k, v in smoke.engine.items()}}
    workloads = Planner(default, seed, valid_workload=valid_workload).next_group(0, Coverage(default.dims()), count).workloads
    order = [label for i in range(count) for label in (("now", "before") if i % 2 == 0 else ("before", "now"))]
    keys = [f"{label}-{i // 2}" for i, label in enumerate(order)]
    now, rescore_ordinary = runner.run_trial, runner.RESCORE_ORDINARY

    def either(*args, **kwargs):
        before = args[5].startswith("before")  # the trial key
        runner.RESCORE_ORDINARY = runner.RESCORE_MAX if before else rescore_ordinary
        return now(*args[:8], measure_floor=True if before else args[8])

    runner.run_trial = either
    oracles = OracleConfig()
    path = out / "trials.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    spec = GroupSpec("trials", engine, resolve_model("smollm2"), [(k, workloads[i // 2]) for i, k in enumerate(keys)],
                     time.time() + 3600, oracles=oracles)
    run_group(spec, str(path))
    results = {e.trial: e.result for e in read_events(path, 0)[0] if isinstance(e, TrialFinished)}
    for label in ("before", "now"):
        mine = [(k, results[k]) for k in keys if k.startswith(label) and k in results]
        phases: Counter = Counter()
        for _, r in mine:
            phases.update(r.phase_seconds)
        seconds = sum(r.seconds for _, r in mine)
        print(f"{label:>6}: {len(mine)} trials, {seconds:.0f} s ({seconds / max(len(mine), 1):.1f} s a trial); "
              + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(phases.items())))
        print("        " + "; ".join(f"{k} {r.status} {r.num_requests} requests, re-scored {r.oracles['metamorphic'].tokens} "
                                     f"tokens, alone {r.oracles['batch_invariance'].requests}" if r.oracles else f"{k} {r.status}"
                                     for k, r in mine))


def hunt_stats(hunt_dir: Path) -> dict:
    """Trials an hour, phase seconds and first-finding times, from a hunt dir's store."""
    from rollout_lab.hunt.report import phase_totals
    from rollout_lab.hunt.store import Store

    store = Store(hunt_dir / "hunt.db")
    elapsed = float(store.meta("elapsed_s", 0.0))
    ran = [t for t in store.trials() if t.status != "rejected"]
    groups = store.groups()
    return {"elapsed": elapsed, "trials": len(ran), "per_hour": 3600 * len(ran) / max(elapsed, 1e-9),
            "groups": len(groups), "rejected_groups": sum(g.status == "rejected" for g in groups),
            "phases": phase_totals(store), "findings": {str(f.signature): f.first_elapsed for f in store.findings()}}


def run_hunt(tree: Path, out: Path, budget: float, overrides: list[str]) -> dict:
    env = os.environ | {"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "rollout_lab.hunt", f"hunt.budget_s={budget}", "hunt.minimize=false",
                    f"hydra.run.dir={out}", *overrides], cwd=tree, env=env, stdout=(out.parent / f"{out.name}.log").open("w"),
                   stderr=subprocess.STDOUT, check=False)
    return hunt_stats(out)


def known_crashes() -> list[str]:
    return sorted(p.read_text().strip() for p in (REPO / "repro").glob("hunt_*/signature.txt"))


def tree_at(commit: str, path: Path) -> Path:
    """A worktree of `commit` at `path` (made once), so the tree under test stays as it was all run."""
    if not path.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=REPO, check=True)
    return path


def hunts(base: str, after: str, budget: float, out: Path, overrides: list[str], fault_overrides: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    before, after_tree = tree_at(base, out / "base_tree"), tree_at(after, out / "after_tree")
    rows = []
    for label, extra in (("no fault", []), (f"fault={PLANTED[0]}", [f"fault={PLANTED[0]}", *fault_overrides])):
        for name, tree in (("before", before), ("after", after_tree)):
            started = time.time()
            stats = run_hunt(tree, out / f"{name}_{label.replace('=', '_').replace(' ', '_')}", budget, overrides + extra)
            stats["wall"] = time.time() - started
            rows.append((label, name, stats))
    targets = known_crashes() + [PLANTED[1]]
    for label, name, s in rows:
        print(f"{label:>18} {name:>6}: {s['trials']} trials in {s['elapsed']:.0f} s = {s['per_hour']:.0f}/h; "
              f"{s['groups']} groups ({s['rejected_groups']} rejected)")
        print("    seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(s["phases"].items(), key=lambda kv: -kv[1])))
        for sig in targets:
            found = s["findings"].get(sig)
            print(f"    {sig[:90]}: " + (f"found at {found:.0f} s" if found is not None else "not found"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("draws", help="validated draws without and with learned constraints (no engine)")
    d.add_argument("--space", default="default", help="a conf/hunt preset (default: default)")
    d.add_argument("--draws", type=int, default=60)
    d.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("trials", help="the oracles' cost per trial, before and after, on one configuration")
    t.add_argument("--trials", type=int, default=4, help="workloads, each run twice")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=Path("/tmp/bench_hunt"))
    h = sub.add_parser("hunt", help="trials an hour and time to each finding, base commit then this tree")
    h.add_argument("--base", default="4658f49", help="the commit to measure 'before' on (a worktree under --out)")
    h.add_argument("--after", default="HEAD", help="the commit to measure 'after' on (default: HEAD; a worktree too)")
    h.add_argument("--budget-s", type=float, default=600)
    h.add_argument("--out", type=Path, default=Path("/tmp/bench_hunt"))
    h.add_argument("--fault-overrides", default="hunt=smoke",
                   help="overrides of the planted-fault hunts, space separated (default: hunt=smoke, whose tight cache preempts)")
    h.add_argument("overrides", nargs="*", help="more hunt overrides, for every hunt of both trees")
    args = parser.parse_args()
    if args.what == "draws":
        draws(args.space, args.draws, args.seed)
    elif args.what == "trials":
        trials(args.trials, args.seed, args.out.resolve())
    else:
        hunts(args.base, args.after, args.budget_s, args.out.resolve(), args.overrides, args.fault_overrides.split())
    return 0


if __name__ == "__main__":
    sys.exit(main())
