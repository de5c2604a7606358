"""Outcome classes, threshold wording and the next sweep, on hand-made run signatures (no engine)."""
import pytest

from rollout_lab.analysis.outcome import (
    CLEAN,
    CRASH,
    NOT_RUN,
    SILENT,
    SYNC,
    Switch,
    next_sweep_command,
    outcome_class,
    outcome_label,
    values_between,
    vllm_refusal,
)
from rollout_lab.analysis.report import SweepReport, markdown
from rollout_lab.analysis.signature import RunSignature
from rollout_lab.analysis.verdict import NO_VERDICT, NONE, STRUCTURAL, variable_verdicts

SEQS = "engine.max_num_seqs"
CACHE = "engine.kv_cache_memory_bytes"
CRASH_KEY = "RuntimeError@vllm/v1/worker/gpu_model_runner.py:_prepare_inputs|vllm/v1/worker/gpu_model_runner.py:execute_model"
REFUSAL = "ValueError: To serve at least one request with the model's max seq len (64), (0.00 GiB KV cache is needed"


def run(name, config, outcome, crash_key=None, refusal=None, spikes=0):
    """A signature as run_signature makes it, without token table (only the outcome test sees it)."""
    status = {CRASH: "crash", NOT_RUN: "crash", SYNC: "sync_mismatch"}.get(outcome, "ok")
    return RunSignature(name=name, run_dir=f"/sweep/{name}", status=status, config={"run_name": "s"} | config,
                        spike_threshold=1e-3, crash_key=crash_key, num_spikes=spikes, outcome=outcome, refusal=refusal)


def test_outcome_class_puts_a_refusal_before_a_crash_and_a_sync_mismatch_before_its_spikes():
    assert outcome_class("crash", 0, refused=True) == NOT_RUN
    assert outcome_class("crash", 5, refused=False) == CRASH
    assert outcome_class("sync_mismatch", 5, refused=False) == SYNC
    assert outcome_class("ok", 5, refused=False) == SILENT
    assert outcome_class("interrupted", 0, refused=False) == CLEAN
    assert outcome_label(CRASH, CRASH_KEY) == "crash RuntimeError at gpu_model_runner.py:execute_model"
    assert outcome_label(SILENT, None) == SILENT


def test_a_crash_anywhere_but_engine_start_is_never_asked_whether_vllm_refused_it():
    from rollout_lab.config import RunConfig
    from rollout_lab.crash import CrashSignature

    assert vllm_refusal(RunConfig(), CrashSignature("ValueError", "no", phase="generate")) is None
    assert vllm_refusal(RunConfig(), CrashSignature("ValueError", "no", phase="weight_sync")) is None


def test_clean_then_failing_states_the_threshold_and_the_next_sweep():
    switch = Switch(SEQS, [1, 2, 8, 32], [CLEAN, CLEAN, SILENT, SILENT], ordered=True)
    assert switch.threshold == (2, 8) and switch.monotone is True
    assert switch.sentence() == (f"fails from {SEQS} >= 8 (clean at 1, 2): silent mismatch; "
                                 "the threshold lies between 2 and 8, and the failure is monotone in it")
    assert values_between(*switch.threshold) == [3, 4, 5, 6, 7]


def test_failing_then_clean_reads_downwards():
    switch = Switch(CACHE, [16000000, 32000000, 64000000], [SILENT, CLEAN, CLEAN], ordered=True)
    assert switch.threshold == (16000000, 32000000) and switch.monotone is True
    assert switch.sentence().startswith(f"fails up to {CACHE} <= 16000000 (clean at 32000000, 64000000): silent mismatch;")


def test_back_and_forth_is_not_monotone_and_names_the_first_switch_from_clean():
    switch = Switch(SEQS, [1, 2, 4, 8], [SILENT, CLEAN, SILENT, CLEAN], ordered=True)
    assert switch.monotone is False and switch.threshold == (1, 2)
    assert switch.sentence() == (f"not monotone in {SEQS}: silent mismatch at 1; clean at 2; silent mismatch at 4; clean at 8; "
                                 "the first switch to or from clean lies between 1 and 2")


def test_a_change_of_failure_class_without_a_clean_value():
    crash = outcome_label(CRASH, CRASH_KEY)
    switch = Switch(SEQS, [1, 2, 4, 8], [crash, crash, SILENT, SILENT], ordered=True)
    assert switch.threshold == (2, 4) and switch.monotone is True
    assert switch.sentence() == (f"{crash} up to {SEQS} <= 2, silent mismatch from {SEQS} >= 4; "
                                 "the failure changes class between 2 and 4, monotone in it")


def test_unordered_values_have_no_threshold():
    switch = Switch("engine.enable_prefix_caching", [False, True], [CLEAN, SILENT], ordered=False)
    assert switch.threshold is None and switch.monotone is None
    assert switch.sentence() == "fails at engine.enable_prefix_caching = true (clean at false): silent mismatch at true"
    assert Switch(SEQS, [1, 2], [SILENT, SILENT], ordered=True).sentence() == ""


def test_values_between_fill_the_gap_evenly():
    assert values_between(12000000, 24000000) == [14000000, 16000000, 18000000, 20000000, 22000000]
    assert values_between(1, 32) == [2, 3, 6, 10, 18]  # geometric: batch sizes grow by factors
    assert values_between(0.02, 0.1) == [0.0262, 0.0342, 0.0447, 0.0585, 0.0765]  # 0.02 x 5^(k/6)
    assert values_between(0.1, 0.2) == [0.117, 0.133, 0.15, 0.167, 0.183]
    assert values_between(4, 5) == [] and values_between(False, True) == []


def test_the_next_sweep_keeps_the_other_overrides_and_replaces_the_grid():
    overrides = ["workload.max_tokens=32", "+sweep=max_num_seqs", "fault=batch_threshold", "engine.max_num_seqs=1,2,8", "workload.max_tokens=16"]
    assert next_sweep_command(SEQS, [3, 4, 5, 6, 7], overrides) == (
        "python -m rollout_lab -m +sweep=max_num_seqs fault=batch_threshold workload.max_tokens=16 engine.max_num_seqs=3,4,5,6,7")


def test_a_variable_that_switches_the_failure_on_is_structural_with_its_threshold():
    runs = [run(str(i), {SEQS: n}, CLEAN if n < 8 else SILENT, spikes=0 if n < 8 else 3) for i, n in enumerate([1, 2, 8, 32])]
    (verdict,) = variable_verdicts(runs)
    assert verdict.verdict == STRUCTURAL and [t.feature for t in verdict.moved] == ["outcome"]
    assert verdict.sentence.startswith(f"fails from {SEQS} >= 8 (clean at 1, 2)")
    assert verdict.threshold == (2, 8) and verdict.monotone is True and verdict.next_values == [3, 4, 5, 6, 7]


def test_refused_points_enter_no_test_and_are_named_in_the_sentence():
    ran = [run("1", {CACHE: 12000000}, CLEAN), run("2", {CACHE: 24000000}, SILENT, spikes=4), run("3", {CACHE: 48000000}, SILENT, spikes=9)]
    refused = [run("0", {CACHE: 1000000}, NOT_RUN, refusal=REFUSAL)]
    (with_refused,) = variable_verdicts(ran, not_run=refused)
    (without,) = variable_verdicts(ran)
    assert with_refused.values == without.values == [12000000, 24000000, 48000000]
    assert with_refused.verdict == without.verdict == STRUCTURAL and with_refused.threshold == without.threshold == (12000000, 24000000)
    assert with_refused.not_run == {"1000000": REFUSAL}
    assert with_refused.sentence == without.sentence + "; not run at 1000000 (vLLM refused the configuration)"
    # A refused point is not a failure: next to clean runs the verdict stays none.
    (clean,) = variable_verdicts([run("1", {CACHE: 12000000}, CLEAN), run("2", {CACHE: 24000000}, CLEAN)], not_run=refused)
    assert clean.verdict == NONE and clean.tests == []


def test_a_sweep_refused_everywhere_or_but_once_gives_no_verdict():
    refused = [run(str(i), {CACHE: size}, NOT_RUN, refusal=REFUSAL) for i, size in enumerate([1000000, 2000000])]
    (verdict,) = variable_verdicts([], not_run=refused)
    assert verdict.verdict == NO_VERDICT and verdict.values == [] and verdict.tests == []
    assert verdict.sentence.startswith("every point was refused by vLLM")
    (single,) = variable_verdicts([run("2", {CACHE: 24000000}, SILENT, spikes=3)], not_run=refused)
    assert single.verdict == NO_VERDICT and single.sentence.startswith(f"only {CACHE} = 24000000 ran; not run at 1000000, 2000000")

    text = markdown(SweepReport("/sweep", [], refused, [], {v.variable: v.values for v in [verdict]}, [verdict]))
    assert "0 runs analyzed, 2 not run (refused by vLLM)" in text
    assert "Every point was refused by vLLM at start: no run, no verdict" in text
    assert "## Not run: configurations vLLM refused at start" in text and f"| 0 | 1000000 | {REFUSAL}" in text


@pytest.mark.parametrize("labels, expected", [
    ([CLEAN, SILENT], (1, 2)),
    ([SILENT, SYNC, CLEAN], (2, 4)),
])
def test_the_threshold_prefers_the_switch_to_or_from_clean(labels, expected):
    assert Switch(SEQS, [1, 2, 4][: len(labels)], labels, ordered=True).threshold == expected
