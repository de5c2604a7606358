"""The minimizer on a batch-invariance failure, end to end on the CPU engine, as a user runs it
(`python -m rollout_lab.minimize case.json`), the emitted repro.py verified in fresh interpreters.

vLLM CPU has no batch-invariant mode (docs/invariance.md), so the failure is the planted fault
batch_threshold: noise on the logits of every engine step that schedules >= min_batch requests.
hybrid-tiny in float32 is bitwise batch-invariant on this CPU without it (batches of 2-6 requests,
prompts of 1-40 tokens, measured), so the repro must be clean with --no-fault.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollout_lab.minimize import bug_report

from rollout_lab.minimize.handoff import CaseFile, MinimizedResult
from rollout_lab.minimize.standalone import Case, Expected, Request

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_a_batch_invariance_failure_minimizes_to_a_batch_of_min_batch_and_its_repro_reproduces_fresh(tmp_path):
    # The RL job's hybrid-tiny engine (max_num_seqs and max_model_len off vLLM's defaults), six seeded requests.
    engine_args = {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 64, "enforce_eager": True, "seed": 0,
                   "disable_log_stats": False, "gpu_memory_utilization": 0.3}
    requests = [Request([100 + 37 * i + j for j in range(12)], 1000 + i, i, 0) for i in range(6)]
    case = Case("hybrid-tiny", engine_args, requests, max_tokens=8, fault="batch_threshold",
                fault_params={"min_batch": 3, "scale": 0.1, "seed": 0})
    path = CaseFile("hybrid-tiny", case, Expected("batch_invariance", 0.0, targets=4),
                    "6 seeded requests, batch_threshold planted").write(tmp_path / "finding" / "case.json")

    done = subprocess.run([sys.executable, "-m", "rollout_lab.minimize", str(path), "--out", str(tmp_path / "repro"),
                           "--name", "bi"], cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=1800)
    # Exit 0: repro.py reproduced in a fresh interpreter without rollout_lab, and was clean with --no-fault.
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    out = tmp_path / "repro" / "bi"
    info = MinimizedResult.read(out)
    assert info.knobs == [] and info.env == {}
    assert info.after.startswith("1 prompts x 3 samples (3 requests), max_tokens 1, prompts <= 1 tokens"), info.after
    assert "repro.py in a fresh process: REPRODUCED: 3/3 target requests differ alone vs in the batch of 3" in done.stdout
    report = (out / "REPORT.md").read_text()
    assert "planted fault off (--no-fault): clean 1/1" in report
    assert report.startswith("# [Bug]: a request's logprobs depend on its batch (CPU) [planted fault]")
    assert bug_report.problems(report) == []
    # Every trial of a batch of one was skipped: the log holds none.
    trials = [json.loads(line) for line in (out / "reduction.jsonl").read_text().splitlines()]
    assert min(t["size"]["requests"] for t in trials) == 2
    assert len(trials) <= 25
