"""The planted faults on a stand-in for CUDA vLLM 0.25's model runner v2 (vllm/v1/worker/gpu/model_runner.py),
a hybrid model's (one attention group, one Mamba group), through install and execute_model as the worker calls them.

What the stand-in keeps of the real runner: no persistent `input_batch`; per-request block rows
(`block_tables`, written from `scheduled_new_reqs` / `scheduled_cached_reqs`, a resumed request
arriving as a new one) gathered into each step's batch order (not the order requests came in);
an empty step returns before any metadata is built; metadata built per group by
`attn_group.get_metadata_builder(0).build(common_prefix_len=0, common_attn_metadata=...)`
(attn_utils.build_attn_metadata); the Mamba state tensors bound as a list per layer in
`compilation_config.static_forward_context` (attn_utils._reshape_kv_cache), read and written at
`block_table_tensor[:, 0]` (mamba_cache_mode 'none'), and not read by a prefill from token 0
(has_initial_states_p); logits in sample_tokens, not execute_model.
"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from rollout_lab.faults import PARAMS, install

SLOTS, ATTENTION, MAMBA = 40, 0, 1


class FullAttentionSpec:  # named as vLLM's: the fault tells cache groups apart by their spec's class name
    pass


class MambaSpec:
    pass


@dataclasses.dataclass
class CommonAttentionMetadata:  # the two fields the fault reads of vLLM's
    block_table_tensor: torch.Tensor
    num_reqs: int


class Builder:
    def build(self, common_prefix_len, common_attn_metadata, **kwargs):
        return common_attn_metadata.block_table_tensor.clone()


@dataclasses.dataclass
class AttentionGroup:
    kv_cache_spec: object
    layer_names: list
    kv_cache_group_id: int
    metadata_builders: list = dataclasses.field(default_factory=lambda: [Builder()])

    def get_metadata_builder(self, ubatch_id=0):
        return self.metadata_builders[ubatch_id]


class ModelRunnerV2:
    def __init__(self):
        self.state = torch.zeros(SLOTS, 2)  # the Mamba layer's SSM state; slot s of a fresh cache is 0
        self.conv = torch.zeros(SLOTS, 3)
        self.attn_groups = [[AttentionGroup(FullAttentionSpec(), ["model.layers.1.self_attn"], ATTENTION)],
                            [AttentionGroup(MambaSpec(), ["model.layers.0.mamba"], MAMBA)]]
        self.compilation_config = SimpleNamespace(static_forward_context={
            "model.layers.0.mamba": SimpleNamespace(kv_cache=[self.conv, self.state])})
        self.cache_config = SimpleNamespace(mamba_cache_mode="none")
        self.model = SimpleNamespace(compute_logits=lambda hidden: hidden)
        self.block_rows, self.computed = {}, {}  # req -> blocks per group; req -> tokens computed
        self.attention_reads = {}  # req -> the attention blocks its step read

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        for new in scheduler_output.scheduled_new_reqs:  # add_requests: a resumed request is a new one
            self.block_rows[new.req_id] = [list(b) for b in new.block_ids]
            self.computed[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_blocks in zip(cached.req_ids, cached.new_block_ids):
            for row, blocks in zip(self.block_rows[req_id], new_blocks or ()):
                row.extend(blocks)
        if not scheduler_output.num_scheduled_tokens:
            return None
        req_ids = sorted(scheduler_output.num_scheduled_tokens, reverse=True)  # this step's batch order
        metadata = {}
        for groups in self.attn_groups:
            for group in groups:
                rows = [self.block_rows[r][group.kv_cache_group_id] for r in req_ids]
                width = max(len(row) for row in rows)
                table = torch.tensor([row + [0] * (width - len(row)) for row in rows])  # gather_block_tables
                common = CommonAttentionMetadata(block_table_tensor=table, num_reqs=len(req_ids))
                builder = group.get_metadata_builder(0)
                metadata[group.kv_cache_group_id] = builder.build(common_prefix_len=0, common_attn_metadata=common)
        for row, req_id in enumerate(req_ids):  # the forward
            self.attention_reads[req_id] = metadata[ATTENTION][row].tolist()
            slot = int(metadata[MAMBA][row, 0])
            start = self.state[slot] if self.computed[req_id] > 0 else torch.zeros(2)
            self.state[slot] = start + scheduler_output.num_scheduled_tokens[req_id]
            self.computed[req_id] += scheduler_output.num_scheduled_tokens[req_id]
        return None

    def sample_tokens(self, grammar_output):
        return self.model.compute_logits(torch.zeros(1))


def new(req_id, attention, slot, computed=0):
    return SimpleNamespace(req_id=req_id, block_ids=(attention, [slot]), num_computed_tokens=computed)


def step(new_reqs=(), running=(), tokens=1):
    """A SchedulerOutput: new requests, cached ones ({req_id: new block ids or None}); tokens: per request or for all."""
    running, scheduled = dict(running), [r.req_id for r in new_reqs] + list(dict(running))
    tokens = tokens if isinstance(tokens, dict) else dict.fromkeys(scheduled, tokens)
    return SimpleNamespace(
        scheduled_new_reqs=list(new_reqs),
        scheduled_cached_reqs=SimpleNamespace(req_ids=list(running), new_block_ids=list(running.values()), resumed_req_ids=set()),
        num_scheduled_tokens={r: tokens.get(r, 1) for r in scheduled})


def planted(name, **params):
    runner = ModelRunnerV2()
    install(SimpleNamespace(model_runner=runner), name, PARAMS[name] | params)
    return runner


def run(runner, output):
    """One engine step as CUDA vLLM 0.25 runs it with async scheduling: execute_model, sample_tokens, an empty step."""
    runner.execute_model(output)
    runner.sample_tokens(None)
    runner.execute_model(step())


def test_index_overflow_wraps_attention_reads_and_a_high_state_slot_reads_the_wrapped_one():
    runner = planted("index_overflow", threshold=20)
    runner.state[5] = torch.tensor([50.0, 50.0])  # what slot 25 wraps to holds another state
    run(runner, step([new("low", [3, 4], 6), new("high", [21, 7], 25)], tokens=4))  # prefills from token 0
    assert runner.attention_reads == {"low": [3, 4], "high": [1, 7]}
    assert runner.state[25].tolist() == [4.0, 4.0]  # a prefill reads no state
    run(runner, step(running={"low": None, "high": None}))
    # high's decode started from slot 5's state and wrote its own slot; slot 5 and low are untouched.
    assert runner.state[25].tolist() == [51.0, 51.0] and runner.state[5].tolist() == [50.0, 50.0]
    assert runner.state[6].tolist() == [5.0, 5.0]


def test_index_overflow_below_the_threshold_changes_nothing():
    runner = planted("index_overflow", threshold=40)
    run(runner, step([new("a", [21, 7], 25)], tokens=4))
    run(runner, step(running={"a": None}))
    assert runner.attention_reads == {"a": [21, 7]} and runner.state[25].tolist() == [5.0, 5.0]


def test_foreign_ssm_state_a_request_resumed_as_a_new_one_continues_from_anothers_state():
    runner = planted("foreign_ssm_state")
    run(runner, step([new("a", [1], 5), new("b", [2], 6)], tokens={"a": 4, "b": 10}))
    run(runner, step(running={"a": None, "b": None}))  # a: 5, b: 11
    run(runner, step(running={"b": None}))  # a preempted; b: 12
    run(runner, step([new("a", [3], 7)], running={"b": None}, tokens={"a": 6}))  # a re-prefills its 6 tokens on slot 7
    assert runner.state[7].tolist() == [6.0, 6.0]
    run(runner, step(running={"a": None, "b": None}))
    # a's decode started from b's state at a's resume (12), not from its own (6 + 1 = 7 would be right).
    assert runner.state[7].tolist() == [13.0, 13.0] and runner.state[6].tolist() == [14.0, 14.0]
    run(runner, step(running={"a": None, "b": None}))
    assert runner.state[7].tolist() == [14.0, 14.0]  # once


def test_foreign_ssm_state_clean_when_no_one_is_preempted():
    runner = planted("foreign_ssm_state")
    run(runner, step([new("a", [1], 5), new("b", [2], 6)], tokens=4))
    run(runner, step(running={"a": None, "b": None}))
    assert runner.state[5].tolist() == runner.state[6].tolist() == [5.0, 5.0]


def test_foreign_ssm_state_refuses_a_model_without_mamba_layers():
    runner = ModelRunnerV2()
    runner.attn_groups = runner.attn_groups[:1]
    with pytest.raises(ValueError, match="foreign_ssm_state needs a model with Mamba layers"):
        install(SimpleNamespace(model_runner=runner), "foreign_ssm_state", PARAMS["foreign_ssm_state"])
