"""A run's preemption count: vLLM's counter summed over steps and workers, None where vLLM reports none."""
import json

from rollout_lab.__main__ import print_summary
from rollout_lab.loop import add_preemptions, engine_metrics
from rollout_lab.records import RolloutBatch, RunResult, read_summary, write_summary


def batch(stats: dict) -> RolloutBatch:
    return RolloutBatch(step=0, worker=0, samples=[], engine_stats=stats)


def test_an_unreported_preemption_count_stays_unknown_through_the_run_and_its_summary(tmp_path):
    """Defect: a step whose engine reported no preemption counter added 0, so "not reported" read as
    "no preemption" in summary.json, the console and W&B."""
    assert RunResult("r", "runs/r").preemptions is None
    total = None
    for _ in range(2):
        total = add_preemptions(total, engine_metrics([batch({"prompt_tokens": 9.0})]))
    assert total is None
    result = RunResult("r", str(tmp_path), preemptions=total)
    write_summary(tmp_path, result)
    assert json.loads((tmp_path / "summary.json").read_text())["preemptions"] is None
    assert read_summary(tmp_path).preemptions is None
    # Reported, even as 0: a count.
    counted = add_preemptions(None, engine_metrics([batch({"preemptions": 0.0}), batch({"preemptions": 0.0})]))
    assert counted == 0.0
    assert add_preemptions(counted, engine_metrics([batch({"preemptions": 2.0}), batch({"preemptions": 1.0})])) == 3.0


def test_a_worker_that_reports_no_count_makes_the_steps_count_unknown():
    """Defect: a counter one worker lacks was summed as 0 for it (or dropped when worker 0 lacked it)."""
    assert "engine/preemptions" not in engine_metrics([batch({"preemptions": 2.0}), batch({})])
    assert "engine/preemptions" not in engine_metrics([batch({}), batch({"preemptions": 2.0})])


def test_the_console_says_unknown_not_no_preemption(capsys):
    """Defect: with no count reported the console said "vLLM counted no preemption; the rare regime was not reached"."""
    result = RunResult("r", "runs/r", status="ok", spike_threshold=1e-3, preemptions=None)
    print_summary(result, pressure="kv_tight")
    out = " ".join(capsys.readouterr().out.split())
    assert "counted no preemption" not in out
    assert "preemptions: not reported" in out
    assert "pressure kv_tight: this vLLM reports no preemption count" in out
    print_summary(RunResult("r", "runs/r", status="ok", spike_threshold=1e-3, preemptions=0.0), pressure="kv_tight")
    assert "vLLM counted no preemption" in " ".join(capsys.readouterr().out.split())
