"""`python -m rollout_lab.analyze <sweep_dir>`: (re)run the structure-versus-magnitude analysis of a sweep."""
from __future__ import annotations

import argparse
import sys

from rollout_lab.analysis.report import SweepDirError, analyze_sweep, print_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollout_lab.analyze", description=__doc__)
    parser.add_argument("sweep_dir", help="a Hydra multirun dir, e.g. multirun/2026-01-01/12-00-00-cache_size")
    parser.add_argument("--wandb", choices=("offline", "online", "disabled"), default=None,
                        help="W&B mode for the report run (default: the runs' logger.mode)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutation tests")
    args = parser.parse_args(argv)
    try:
        report = analyze_sweep(args.sweep_dir, seed=args.seed, wandb_mode=args.wandb)
    except SweepDirError as exc:
        print(f"rollout_lab.analyze: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
