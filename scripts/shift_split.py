"""False positives of the shift test from one clean run: its prompts split at random into a profile half and a tested half.

    python scripts/shift_split.py RUN_DIR [--splits 20]

Every split keeps a prompt's samples together (they share the prompt, so they are not independent);
the tested half stands for a clean run at other prompts. Also prints the run's test against itself.
The splits share tokens, so they estimate the rate with correlated trials (docs/shift.md).
"""
import argparse

import numpy as np

from rollout_lab.records import read_records
from rollout_lab.shift import shift_frame, shift_test

parser = argparse.ArgumentParser()
parser.add_argument("run_dir")
parser.add_argument("--splits", type=int, default=20)
args = parser.parse_args()
frame = shift_frame(args.run_dir)
prompts = read_records(args.run_dir).column("prompt_index").to_numpy()
print(f"against itself: {shift_test(frame, None).sentence()}")
rng = np.random.default_rng(0)
unique = np.unique(prompts)
shifted = 0
for split in range(args.splits):
    half = rng.choice(unique, size=len(unique) // 2, replace=False)
    tested = np.isin(prompts, half)
    result = shift_test(frame[tested], frame[~tested], seed=split)
    shifted += result.shifted
    print(f"split {split}: {result.sentence()}")
print(f"{shifted} of {args.splits} splits shifted")
