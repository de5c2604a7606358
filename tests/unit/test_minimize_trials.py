"""The k-of-n rule, the predicate, and the trial log, without an engine."""
import json

import pytest

from rollout_lab.minimize.standalone import Case, Expected, Outcome, Request, request_class, same_failure
from rollout_lab.minimize.trials import Rule, TrialRecord, calibrated_rule, case_key, read_log


def test_rule_decides_as_soon_as_the_outcome_is_certain():
    rule = Rule(tries=3, need=2)
    assert rule.decision(failures=1, runs=1) is None
    assert rule.decision(failures=2, runs=2) is True
    # One failure in two runs: the third run still decides.
    assert rule.decision(failures=1, runs=2) is None
    # No failure in two runs: even a failing third run makes only 1 of 3.
    assert rule.decision(failures=0, runs=2) is False
    assert Rule().decision(failures=0, runs=1) is False and Rule().decision(failures=1, runs=1) is True


def test_rule_rejects_impossible_thresholds():
    with pytest.raises(ValueError, match="need=3 of tries=2"):
        Rule(tries=2, need=3)
    with pytest.raises(ValueError, match="need=0"):
        Rule(tries=2, need=0)


def test_calibration_picks_one_run_for_a_steady_failure_and_k_of_n_for_a_flaky_one():
    assert calibrated_rule(3, 3) == Rule(1, 1)
    assert calibrated_rule(1, 3) == Rule(tries=3, need=1)
    with pytest.raises(ValueError, match="did not|reproduced"):
        calibrated_rule(0, 3)


def test_request_class_says_how_the_flagged_requests_were_reached():
    # (num_preemptions, num_cached_tokens) of each flagged request.
    assert request_class([]) is None
    assert request_class([(1, 0), (2, 64)]) == "preempted"
    # A resumed request's wrong KV reaches another through the prefix cache: still "preempted".
    assert request_class([(1, 0), (0, 64)]) == "preempted"
    assert request_class([(0, 32), (0, 64)]) == "prefix_cached"
    assert request_class([(1, 0), (0, 0)]) == "any"


def test_same_failure_is_the_same_crash_key_or_flagged_tokens_of_the_same_class():
    crash = Expected("crash", 1e-3, crash_key="RuntimeError@vllm/a.py:f")
    assert same_failure(crash, Outcome(crash_key="RuntimeError@vllm/a.py:f"))
    assert not same_failure(crash, Outcome(crash_key="ValueError@vllm/b.py:g"))
    assert not same_failure(crash, Outcome(num_tokens=10))

    mismatch = Expected("mismatch", 1e-3, request_class="preempted")
    assert same_failure(mismatch, Outcome(num_tokens=10, num_flagged=1, request_class="preempted"))
    assert not same_failure(mismatch, Outcome(num_tokens=10, num_flagged=3, request_class="any"))
    assert not same_failure(mismatch, Outcome(num_tokens=10, num_flagged=0))
    assert not same_failure(mismatch, Outcome(crash_key="RuntimeError@x"))

    ordinary = Expected("mismatch", 1e-3, request_class="any")
    assert same_failure(ordinary, Outcome(num_tokens=4, num_flagged=1, request_class="prefix_cached"))
    assert not same_failure(ordinary, Outcome(num_tokens=4, num_flagged=1, request_class="preempted"))


def _case(**changes) -> Case:
    fields = dict(model="m", engine_args={"block_size": 32}, requests=[Request([1, 2, 3], seed=7)], max_tokens=8)
    return Case(**(fields | changes))


def test_case_key_changes_with_anything_that_decides_the_verdict():
    expected = Expected("mismatch", 1e-3, request_class="any")
    key = case_key(_case(), expected)
    assert key == case_key(_case(), expected)
    assert key != case_key(_case(max_tokens=9), expected)
    assert key != case_key(_case(engine_args={"block_size": 16}), expected)
    assert key != case_key(_case(requests=[Request([1, 2, 3], seed=8)]), expected)
    assert key != case_key(_case(), Expected("mismatch", 1e-2, request_class="any"))


def test_the_log_reads_back_and_skips_a_torn_last_line(tmp_path):
    record = TrialRecord(1, "abc", 0, "prompts", "prompts 8 -> 4", {"prompts": 4}, True, {"num_flagged": 2, "num_tokens": 9}, 1.5)
    path = tmp_path / "reduction.jsonl"
    path.write_text(json.dumps(record.__dict__) + "\n" + '{"trial": 2, "key": "de')
    [again] = read_log(path)
    assert again == record
    assert again.result().num_flagged == 2
    assert read_log(tmp_path / "missing.jsonl") == []


def test_once_the_budget_is_spent_no_candidate_runs_and_each_counts_as_passing(tmp_path):
    from rich.console import Console

    from rollout_lab.minimize.trials import TrialRunner

    runner = TrialRunner(Expected("crash", 1e-3, crash_key="E@vllm/a.py:f"), tmp_path / "log.jsonl", Rule(), Console(),
                         deadline=1.0)  # 1970: already spent

    def no_engine(case):
        raise AssertionError("a candidate ran after the budget was spent")

    runner._outcome = no_engine
    case = Case("m", {}, [Request([1, 2], 0)], 4)
    assert runner.fails(case, "prompts", "x", {}) is False
    assert runner.fails(case, "knobs", "y", {}) is False and runner.records == []


def test_a_candidate_whose_engine_does_not_start_did_not_run_unless_that_is_the_failure(tmp_path):
    import io

    from rich.console import Console

    from rollout_lab.minimize.standalone import crash_outcome
    from rollout_lab.minimize.trials import TrialRunner

    def out_of_memory(case):
        raise ValueError("Free memory on device cuda:0 (2.4/139.8 GiB) is less than desired GPU memory utilization")

    try:
        out_of_memory(None)
    except ValueError as exc:
        start_key = crash_outcome(exc).crash_key
    case = Case("m", {}, [Request([1, 2], 0)], 4)
    for expected_key, failed in (("E@vllm/a.py:f", False), (start_key, True)):
        console = Console(file=io.StringIO(), width=200)
        runner = TrialRunner(Expected("crash", 1e-3, crash_key=expected_key), tmp_path / f"{failed}.jsonl", Rule(), console)
        runner._engine = out_of_memory
        assert runner.fails(case, "knobs", "to default: cache_size", {}) is failed
        [record] = runner.records
        assert record.result().at_start and record.result().describe().startswith("the engine did not start")
        printed = console.file.getvalue()
        assert ("did not run" in printed) is not failed and ("FAIL" in printed) is failed


def test_log_lines_that_no_longer_fit_a_trial_record_are_named_in_one_line_and_kept(tmp_path):
    """Defect: lines of an older reduction.jsonl that no longer fit TrialRecord were dropped silently
    (their candidates ran again with no word of why)."""
    from rich.console import Console

    record = TrialRecord(1, "abc", 0, "prompts", "prompts 8 -> 4", {"prompts": 4}, True, {"num_flagged": 2}, 1.5)
    old = dict(record.__dict__, trial=2, key="def", verdict="fail")  # a key this TrialRecord lacks
    stale_outcome = dict(record.__dict__, trial=3, key="ghi", outcome={"flagged_tokens": 2})  # an Outcome it lacks
    path = tmp_path / "reduction.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in (record.__dict__, old, stale_outcome)) + '{"trial": 4, "key": "de'
    path.write_text(text)
    console = Console(record=True, width=300)
    assert read_log(path, console) == [record]
    said = console.export_text().strip()
    assert said == (f"{path}: 2 of 3 lines do not fit this rollout_lab's trial record (line 2: unexpected key 'verdict'); "
                    "they stay in the file, and their candidates run again")
    assert path.read_text() == text
    # A torn last line alone (an interrupted write) is no news.
    path.write_text(json.dumps(record.__dict__) + "\n" + '{"trial": 2, "key": "de')
    console = Console(record=True, width=300)
    assert read_log(path, console) == [record] and console.export_text() == ""
