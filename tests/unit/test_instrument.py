import json

from rollout_lab.instrument import (CacheGroup, ScheduledRequest, ScheduleReader, SchedulerStep, engine_request_id, header_line,
                                    join_schedule, peak_block_fraction, step_line, token_facts)


def _write(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


HEADER = {"groups": [{"kind": "FullAttentionSpec", "block_size": 4}, {"kind": "MambaSpec", "block_size": 8}], "num_blocks": 20}


def test_tokens_map_to_the_step_that_sampled_them(tmp_path):
    # Request "7" has a 5-token prompt. Step 0 prefills it (blocks 1,2; state slot 9) and samples
    # token 0; step 1 samples token 1; then it is preempted; step 3 re-prefills all 7 tokens into
    # new blocks (3,4; slot 10) and samples token 2.
    path = tmp_path / "w.jsonl"
    _write(path, [
        HEADER,
        {"step": 0, "requests": {"7-ab": [0, 5, [[1, 2], [9]]]}, "preempted": []},
        {"step": 1, "requests": {"7-ab": [5, 1, [[1, 2], [9]]]}, "preempted": []},
        {"step": 2, "requests": {}, "preempted": ["7-ab"]},
        {"step": 3, "requests": {"7-ab": [0, 7, [[3, 4], [10]]]}, "preempted": []},
    ])
    log = ScheduleReader(path).read_new()
    assert log.num_blocks == 20 and len(log.steps) == 4
    facts = token_facts(log, join_schedule(log), "7", prompt_len=5, num_tokens=3)
    # Token j's input position is 4 + j: blocks of size 4 -> index 1 for all three.
    assert facts.kv_blocks == [2, 2, 4]
    assert facts.state_slots == [9, 9, 10]
    assert facts.preemptions_before == [0, 0, 1]


def test_reader_returns_only_new_steps_and_skips_partial_lines(tmp_path):
    path = tmp_path / "w.jsonl"
    _write(path, [HEADER, {"step": 0, "requests": {}, "preempted": []}])
    reader = ScheduleReader(path)
    assert [s.step for s in reader.read_new().steps] == [0]
    with path.open("a") as f:
        f.write(json.dumps({"step": 1, "requests": {}, "preempted": []}) + "\n" + '{"step": 2, "req')
    second = reader.read_new()
    assert [s.step for s in second.steps] == [1]
    assert second.groups == [CacheGroup("FullAttentionSpec", 4), CacheGroup("MambaSpec", 8)]


def test_unscheduled_tokens_have_no_facts(tmp_path):
    path = tmp_path / "w.jsonl"
    _write(path, [HEADER])
    log = ScheduleReader(path).read_new()
    facts = token_facts(log, join_schedule(log), "3", prompt_len=5, num_tokens=2)
    assert facts.kv_blocks == [None, None] and facts.preemptions_before == [0, 0]


def test_engine_request_id_drops_the_suffix():
    assert engine_request_id("12-9f3a") == "12"
    assert engine_request_id("chat-12-9f3a") == "chat-12"


def test_the_lines_the_scheduler_writes_read_back_as_the_same_records(tmp_path):
    groups = [CacheGroup("FullAttentionSpec", 16), CacheGroup("MambaSpec", 256)]
    steps = [SchedulerStep(0, {"3-x": ScheduledRequest(0, 20, [[4, 5], [1]]), "4-y": ScheduledRequest(0, 2, [[6], [2]])}, []),
             SchedulerStep(1, {"4-y": ScheduledRequest(2, 1, [[6], [2]])}, ["3-x"])]
    path = tmp_path / "w.jsonl"
    path.write_text(header_line(groups, 10) + "".join(step_line(s) for s in steps))
    log = ScheduleReader(path).read_new()
    assert (log.groups, log.num_blocks, log.steps) == (groups, 10, steps)
    assert [g.is_mamba for g in log.groups] == [False, True]
    assert peak_block_fraction(log) == 5 / 10  # step 0: blocks 4, 5, 6 and slots 1, 2
