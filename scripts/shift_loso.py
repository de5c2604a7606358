"""Leave-one-step-out false positives of the shift test: each RL step of a clean run against a profile of its other steps.

    python scripts/shift_loso.py RUN_DIR [RUN_DIR ...]

Each step rotates to new prompts (workload.rotate_prompts), so a step stands for a clean run at other
prompts; the profile is every other step of every run given. Prints one line per step and the count
that came out shifted (docs/shift.md).
"""
import sys

import pandas as pd

from rollout_lab.shift import shift_frame, shift_test

frame = pd.concat([shift_frame(d, run_label=f"{i}/").assign(run=i) for i, d in enumerate(sys.argv[1:])], ignore_index=True)
shifted = 0
groups = list(frame.groupby(["run", "step"]))
for (index, step), tested in groups:
    profile = frame[~((frame.run == index) & (frame.step == step))]
    result = shift_test(tested, profile)
    shifted += result.shifted
    print(f"run {index} step {step}: {result.sentence()}")
print(f"{shifted} of {len(groups)} clean steps shifted")
