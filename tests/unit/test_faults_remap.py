"""stale_state's block-table remap on both model runners, without an engine."""
from types import SimpleNamespace

import torch

from rollout_lab.faults import _FaultState


def stale_state(runner) -> _FaultState:
    state = _FaultState(runner, "stale_state", {"p": 1.0, "seed": 0})
    # "a" held blocks 3, 4 before its preemption and 7, 8 now; "b" was never preempted.
    state.block_rows = {"a": ([7, 8],), "b": ([5, 6],)}
    state.stale_rows = {"a": ([3, 4],)}
    return state


def test_v1_runner_rows_follow_the_persistent_batch():
    state = stale_state(SimpleNamespace(input_batch=SimpleNamespace(req_ids=["b", "a"])))
    table = torch.tensor([[5, 6], [7, 8]])
    assert state.remap_block_table(0, table, 2).tolist() == [[5, 6], [3, 4]]


def test_v2_runner_without_a_batch_finds_the_row_by_its_blocks():
    state = stale_state(SimpleNamespace())  # model runner v2 (vLLM 0.25 on CUDA): no input_batch
    table = torch.tensor([[7, 8, 0], [5, 6, 0]])
    assert state.remap_block_table(0, table, 2).tolist() == [[3, 4, 0], [5, 6, 0]]
    # Two rows with the same blocks (a shared prefix, say): neither is provably the request's.
    twice = torch.tensor([[7, 8], [7, 8]])
    assert state.remap_block_table(0, twice, 2).tolist() == [[7, 8], [7, 8]]
