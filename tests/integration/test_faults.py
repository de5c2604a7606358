"""Planted faults under the matching pressure preset are seen by the lab, and point at the right
requests. Each run is composed from conf/ as `python -m rollout_lab +pressure=<p> fault=<f>` composes
it (the presets' own values), one RL step long."""
import json

import numpy as np
import pytest

from rollout_lab.instrument import ScheduleReader, engine_request_id
from rollout_lab.records import read_records, read_summary

pytestmark = pytest.mark.integration


def blocks_by_request(run_dir):
    """Every block id each request held at any step, from the scheduler records."""
    held = {}
    for step in ScheduleReader(run_dir / "schedule" / "worker_0.jsonl").read_new().steps:
        for internal_id, scheduled in step.requests.items():
            held.setdefault(engine_request_id(internal_id), set()).update(b for g in scheduled.blocks for b in g)
    return held


def test_stale_state_hits_only_preempted_requests(stale_state_run):
    """On the session's stale_state run (8 prompts x 2 samples, shared with test_minimize). Fails with the fault
    planted on every request (faults._FaultState.remap_block_table shifting each block table by one under stale_state):
    requests never preempted, without a cache hit, go wrong."""
    result = read_summary(stale_state_run)
    assert result.status == "ok", result.crash
    assert result.preemptions > 0
    table = read_records(stale_state_run).to_pandas()
    flagged = table[table.abs_diff > result.spike_threshold]
    assert len(flagged) > 0
    preempted = table[table.num_preemptions > 0]
    # A preempted request goes wrong only once it has resumed...
    own = flagged[flagged.request_id.isin(set(preempted.request_id))]
    assert len(own) > 0 and (own.preemptions_before >= 1).all()
    # ...and the others it poisons are the ones that reused its KV through the prefix cache:
    # same prompt, cache hit.
    others = flagged[~flagged.request_id.isin(set(preempted.request_id))]
    assert (others.num_cached_tokens > 0).all()
    assert set(others.prompt_index) <= set(preempted.prompt_index)


# Slow tier (its engine run is shared with test_localize.py, all slow); the fast tier runs index_overflow's remap in
# tests/unit/test_faults_remap.py and a planted fault end to end above.
@pytest.mark.slow
def test_index_overflow_hits_only_requests_holding_high_blocks(overflow_run):
    """On the session's many_slots index_overflow run (4 prompts x 4 samples x 16 tokens, shared with test_localize).
    Fails with the fault firing below its threshold (faults._FaultState.remap_block_table wrapping blocks >= 8 mod 8):
    requests that never held a block past 16 go wrong."""
    threshold = json.loads((overflow_run / "config.json").read_text())["fault"]["params"]["threshold"]  # in blocks (stride 1)
    result = read_summary(overflow_run)
    assert result.status == "ok", result.crash
    table = read_records(overflow_run).to_pandas()
    flagged = table[table.abs_diff > result.spike_threshold]
    assert result.spike_fraction > 0.05
    held = blocks_by_request(overflow_run)
    for request_id in set(flagged.request_id):
        assert max(held[request_id]) >= threshold, request_id
    # Requests that never held a block past the threshold are clean (and there are some).
    low = [rid for rid, blocks in held.items() if max(blocks) < threshold]
    assert low and np.all(table[table.request_id.isin(low)].abs_diff <= result.spike_threshold)
