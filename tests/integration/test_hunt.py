"""The hunt end to end on the real engine, the way a user runs it (`python -m rollout_lab.hunt`).

One hunt over the small `hunt=smoke` space with the stale_state fault planted: it must find the
fault as a mismatch on preempted requests; killed with SIGKILL (the whole process group, Ray and
the engine included) and started again on the same dir, it must repeat no trial and keep every
finding. Minimization is left to the minimizer's own tests (hunt.minimize=false) to keep CI short.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollout_lab.hunt.protocol import TrialStarted, read_events
from rollout_lab.hunt.store import Store

# Slow tier (141 s alone): the fast tier covers the driver, its protocol, the search and the report on
# recorded inputs (tests/unit/test_hunt_*.py).
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}


def hunt_command(hunt_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rollout_lab.hunt", "hunt=smoke", "fault=stale_state", "hunt.minimize=false",
            f"hydra.run.dir={hunt_dir}", *overrides]


def findings(hunt_dir: Path) -> list:
    if not (hunt_dir / "hunt.db").exists():
        return []
    return Store(hunt_dir / "hunt.db").findings()


def test_hunt_finds_planted_stale_state_and_a_killed_hunt_resumes_without_repeating_a_trial(tmp_path):
    hunt_dir = tmp_path / "hunt"
    first = subprocess.Popen(hunt_command(hunt_dir, "hunt.max_groups=3"), cwd=REPO, env=ENV, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None and not findings(hunt_dir):
        time.sleep(2)
    # Kill it mid-flight: the driver, Ray and the engine process, with no chance to clean up.
    os.killpg(first.pid, signal.SIGKILL)
    output = first.communicate()[0]
    found = findings(hunt_dir)
    assert found, output[-3000:]
    stale = [f for f in found if str(f.signature) == "mismatch/reference:smollm2:float32:preempted"]
    assert stale, [str(f.signature) for f in found]
    before = Store(hunt_dir / "hunt.db")
    trials_before, hits_before = before.trial_keys(), {f.signature: f.trials for f in found}

    # One more engine with one trial is all a resume needs to show: trials add up, none repeats.
    second = subprocess.run(hunt_command(hunt_dir, "hunt.max_groups=1", "hunt.workloads_per_engine=1"), cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout

    after = Store(hunt_dir / "hunt.db")
    assert trials_before <= after.trial_keys() and len(after.trial_keys()) > len(trials_before)
    # No trial ran twice: every trial started once across both sessions' engine processes.
    starts = [e.trial for path in sorted((hunt_dir / "lines").glob("*.jsonl"))
              for e in read_events(path, 0)[0] if isinstance(e, TrialStarted)]
    assert len(starts) == len(set(starts)), starts
    # No finding lost: each is still there, with at least as many hits.
    kept = {f.signature: f.trials for f in after.findings()}
    assert all(kept.get(sig, 0) >= hits for sig, hits in hits_before.items()), (hits_before, kept)
    # The clock went on from where the first session stopped.
    assert after.meta("elapsed_s") > max(t.elapsed for t in before.trials())

    report = (hunt_dir / "HUNT_REPORT.md").read_text()
    assert str(stale[0].signature) in report
    assert (hunt_dir / "findings_over_time.png").stat().st_size > 0
    # The killed group is accounted for, not left running.
    assert all(g.status != "running" for g in after.groups())
    trial = next(t for t in after.trials() if t.signature == stale[0].signature)
    assert trial.result.preempted_requests > 0 and trial.result.oracles["reference"].max_diff > 1e-3
    # The case handed to the minimizer holds the trial's requests, each with its request's seed.
    assert stale[0].result.case.requests and stale[0].result.case.model == "smollm2"
