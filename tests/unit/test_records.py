import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from rollout_lab.config import RunConfig
from rollout_lab.crash import CrashSignature
from rollout_lab.records import (
    SCHEMA_VERSION,
    TOKEN_SCHEMA,
    RecordsError,
    RolloutBatch,
    RunResult,
    Sample,
    SampledRequest,
    read_config,
    read_records,
    read_requests,
    read_summary,
    token_table,
    write_config,
    write_requests,
    write_step,
    write_summary,
)


def _batch(step=0):
    sample = Sample(
        prompt_index=3, sample_index=1, request_id="7", prompt_token_ids=[1, 2, 3],
        token_ids=[10, 11], sampler_logprobs=[-0.5, -1.0], num_cached_tokens=2,
        num_preemptions=1, finish_reason="length", text="ab",
    )
    return RolloutBatch(step=step, worker=0, samples=[sample])


def test_token_table_has_one_row_per_token_with_schema():
    table = token_table("r", _batch(), [np.array([-0.5, -1.25])], [0.1])
    assert table.schema.equals(TOKEN_SCHEMA, check_metadata=True)
    rows = table.to_pylist()
    assert [r["position"] for r in rows] == [0, 1]
    assert [r["token_id"] for r in rows] == [10, 11]
    assert rows[1]["abs_diff"] == pytest.approx(0.25)
    assert rows[0]["prompt_len"] == 3 and rows[0]["num_preemptions"] == 1
    assert rows[0]["state_slot"] is None


def test_an_unknown_preemption_count_is_null_in_the_table_not_0():
    batch = _batch()
    batch.samples[0].num_preemptions = None
    rows = token_table("r", batch, [np.array([-0.5, -1.25])], [0.1]).to_pylist()
    assert [r["num_preemptions"] for r in rows] == [None, None]


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="logprob lengths differ"):
        token_table("r", _batch(), [np.array([-0.5])], [0.0])


def test_write_then_read_round_trips(tmp_path):
    for step in range(2):
        write_step(tmp_path, step, token_table("r", _batch(step), [np.array([-0.5, -1.0])], [1.0]))
    table = read_records(tmp_path)
    assert table.num_rows == 4
    assert sorted(set(table.column("step").to_pylist())) == [0, 1]
    assert pq.read_schema(tmp_path / "records" / "step_00000.parquet").metadata[b"rollout_lab.schema_version"] == SCHEMA_VERSION.encode()


def test_missing_run_dir_is_named(tmp_path):
    with pytest.raises(RecordsError, match="does not exist"):
        read_records(tmp_path / "nope")


def test_corrupted_file_is_named_and_left_in_place(tmp_path):
    write_step(tmp_path, 0, token_table("r", _batch(), [np.array([-0.5, -1.0])], [1.0]))
    bad = tmp_path / "records" / "step_00001.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(RecordsError, match="step_00001.parquet is corrupted"):
        read_records(tmp_path)
    assert bad.read_bytes() == b"not parquet"


def _request(step=0, seed=None, request_id=None):
    return SampledRequest(step=step, worker=1, request_id=request_id, prompt_index=4, sample_index=2,
                          prompt_token_ids=[5, 6, 7], seed=seed, n=1, max_tokens=16, temperature=0.7,
                          top_p=0.9, top_k=-1, logprobs=0)


def test_requests_round_trip_with_and_without_seed_and_request_id(tmp_path):
    sent = [_request(0, seed=123, request_id="0"), _request(0, seed=None, request_id="1")]
    write_requests(tmp_path, 0, sent)
    write_requests(tmp_path, 1, [_request(1, seed=2**31 - 2)])
    assert read_requests(tmp_path, 0) == sent
    assert [r.step for r in read_requests(tmp_path)] == [0, 0, 1]
    assert read_requests(tmp_path, 1)[0].seed == 2**31 - 2
    with pytest.raises(RecordsError, match="recorded no requests for step 2"):
        read_requests(tmp_path, 2)


def test_a_run_dir_without_requests_and_a_damaged_requests_file_are_named(tmp_path):
    with pytest.raises(RecordsError, match="has no requests/ directory"):
        read_requests(tmp_path)
    write_requests(tmp_path, 0, [_request()])
    (tmp_path / "requests" / "step_00000.parquet").write_bytes(b"torn")
    with pytest.raises(RecordsError, match="requests file .*step_00000.parquet is corrupted"):
        read_requests(tmp_path, 0)


def test_config_round_trips_and_a_bad_one_is_one_line(tmp_path):
    cfg = RunConfig(run_name="x")
    cfg.engine.seed_policy, cfg.engine.block_size, cfg.fault.name = "engine", 32, "stale_state"
    write_config(tmp_path, cfg)
    back = read_config(tmp_path)
    assert back.engine.seed_policy == "engine" and back.engine.block_size == 32 and back.run_name == "x"
    assert back.fault.name == "stale_state"
    for text, problem in [('{"engine": {"seed_policy": "dice"}}', "seed_policy='dice' is not valid"),
                          ('{"engine": {"no_such_knob": 1}}', "not a valid rollout_lab config"),
                          ('{"engine": ', "is corrupted"), ("[1]", "not a JSON object")]:
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(RecordsError, match=problem) as error:
            read_config(tmp_path)
        assert "\n" not in str(error.value)
    (tmp_path / "config.json").unlink()
    with pytest.raises(RecordsError, match="has no config.json"):
        read_config(tmp_path)


def test_summary_round_trips_with_its_crash_signature(tmp_path):
    crash = CrashSignature("RuntimeError", "boom", ["vllm/a.py:f", "vllm/b.py:g"], phase="generate", step=2, traceback="tb")
    result = RunResult("run-1", str(tmp_path), status="crash", steps_completed=2, spike_threshold=1e-3, crash=crash,
                       engine_start_seconds=[1.5], environment={"torch": "2"})
    write_summary(tmp_path, result)
    assert json.loads((tmp_path / "summary.json").read_text())["crash"]["key"] == "RuntimeError@vllm/a.py:f|vllm/b.py:g"
    assert read_summary(tmp_path) == result
    write_summary(tmp_path, RunResult("run-2", str(tmp_path), status="ok", spike_threshold=1e-3))
    assert read_summary(tmp_path).crash is None


def test_an_older_summary_reads_with_defaults_and_a_crash_known_by_its_key_only(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(
        {"status": "crash", "crash": {"key": "ValueError@no-vllm-frame", "message": "no memory", "step": None}}))
    summary = read_summary(tmp_path)
    assert summary.run_id == tmp_path.name and summary.spike_threshold is None
    assert summary.crash == CrashSignature("ValueError", "no memory", [], step=None)


def test_a_bad_summary_is_one_line_naming_the_file_and_the_problem(tmp_path):
    for text, problem in [('{"status": "ok", "spike_', "summary.json is corrupted"),
                          ('{"status": "finished"}', "status 'finished' is not one of ok, crash"),
                          ('{"status": "ok", "colour": 1}', "unknown key.s. colour"),
                          ('{"spike_threshold": "high"}', "spike_threshold 'high' is not a number"),
                          ('{"crash": {"key": "no at sign"}}', "its crash is not a crash signature"),
                          ('{"crash": {"key": "E@no-vllm-frame", "exception_type": "F"}}', "does not match its fields")]:
        (tmp_path / "summary.json").write_text(text)
        with pytest.raises(RecordsError, match=problem) as error:
            read_summary(tmp_path)
        assert "\n" not in str(error.value) and "summary.json" in str(error.value)
    with pytest.raises(RecordsError, match="has no summary.json"):
        read_summary(tmp_path / "elsewhere")


def test_a_crash_signature_is_its_key_as_a_string_and_parses_back():
    crash = CrashSignature("IndexError", "out of range", ["vllm/x.py:f", "vllm/y.py:g"])
    assert str(crash) == crash.key == "IndexError@vllm/x.py:f|vllm/y.py:g"
    assert crash.site == "vllm/y.py:g"
    parsed = CrashSignature.parse(str(crash))
    assert (parsed.exception_type, parsed.vllm_frames, parsed.key) == ("IndexError", crash.vllm_frames, crash.key)
    assert CrashSignature.parse("ValueError@no-vllm-frame").site is None
    with pytest.raises(ValueError, match="is not <exception type>@"):
        CrashSignature.parse("ValueError")


def test_a_run_dir_from_another_vllm_release_reads_its_engine_args_unchecked(tmp_path):
    """Defect: read_config checked engine.args against the installed vLLM, so a run dir recorded with an
    engine argument this release lacks (or refuses) could not be analyzed or minimized."""
    cfg = RunConfig(run_name="other_release")
    cfg.engine.args = {"an_argument_of_another_release": 4, "kv_cache_dtype": "no_such_dtype"}
    write_config(tmp_path, cfg)
    assert read_config(tmp_path).engine.args == cfg.engine.args
