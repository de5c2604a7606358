import numpy as np
import pyarrow.parquet as pq
import pytest

from rollout_lab.records import (
    SCHEMA_VERSION,
    TOKEN_SCHEMA,
    RecordsError,
    RolloutBatch,
    Sample,
    read_records,
    token_table,
    write_step,
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
