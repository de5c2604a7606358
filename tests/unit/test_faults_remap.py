"""The block-table remaps of stale_state and index_overflow on both model runners, and index_overflow's state read, without an engine."""
import dataclasses
from types import SimpleNamespace

import torch

from rollout_lab.faults import _FaultState, _wrap_builders


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


def index_overflow(**params) -> _FaultState:
    state = _FaultState(SimpleNamespace(), "index_overflow", {"threshold": 16, "stride": 1} | params)
    state.ssm_states = [(1, [torch.zeros(20, 2)])]  # group 1: a Mamba group
    return state


def test_index_overflow_wraps_attention_block_ids_past_the_threshold_and_leaves_a_mamba_groups_table():
    table = torch.tensor([[3, 17], [18, 15]])
    assert index_overflow().remap_block_table(0, table, 2).tolist() == [[3, 1], [2, 15]]
    # 64 elements per 4-block stride: the threshold is 16 blocks again.
    assert index_overflow(threshold=64, stride=4).remap_block_table(0, table, 2).tolist() == [[3, 1], [2, 15]]
    # A Mamba group reads and writes its state slot through the table: read_wrapped_states models the read.
    assert index_overflow().remap_block_table(1, table, 2) is table


def test_index_overflow_a_high_state_slot_reads_the_wrapped_one_before_the_step():
    state = index_overflow()
    ssm = state.ssm_states[0][1][0]
    ssm[:] = torch.arange(20).float()[:, None]
    state.block_rows = {"low": ([2], [4]), "high": ([3], [18]), "other": ([5], [19])}
    output = SimpleNamespace(num_scheduled_tokens={"low": 1, "high": 1})  # "other" not scheduled this step
    assert state.read_wrapped_states(output) == [("high", 18, 2)]
    assert ssm[:, 0].tolist() == list(range(18)) + [2.0, 19.0]


@dataclasses.dataclass
class CommonAttentionMetadata:  # the two fields the fault reads of vLLM's
    block_table_tensor: torch.Tensor
    num_reqs: int


class Builder:
    supports_update_block_table = True

    def build(self, common_prefix_len, common_attn_metadata):
        return common_attn_metadata.block_table_tensor

    def update_block_table(self, metadata, blk_table, slot_mapping):
        return blk_table


def test_a_group_built_by_update_block_table_is_remapped_too():
    # Model runner v1 builds a second group of the same spec and builder by update_block_table.
    builder = Builder()
    runner = SimpleNamespace(attn_groups=[[SimpleNamespace(kv_cache_group_id=0, metadata_builders=[builder])]])
    _wrap_builders(runner, _FaultState(runner, "index_overflow", {"threshold": 16, "stride": 1}))
    table = torch.tensor([[3, 17]])
    assert builder.update_block_table(None, table, None).tolist() == [[3, 1]]
    # Model runner v2 (attn_utils.build_attn_metadata) passes keywords.
    common = CommonAttentionMetadata(block_table_tensor=table, num_reqs=1)
    assert builder.build(common_prefix_len=0, common_attn_metadata=common).tolist() == [[3, 1]]
