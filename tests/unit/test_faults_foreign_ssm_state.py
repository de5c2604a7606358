"""foreign_ssm_state's bookkeeping, without an engine: which resumed request reads whose SSM state slot, and when."""
from types import SimpleNamespace

import pytest
import torch

from rollout_lab.faults import PARAMS, _FaultState, _ssm_states

# Cache groups as in hybrid-tiny: 0 attention blocks, 1 the Mamba state slot.
SLOTS = 10


def new(req_id, attention, slot):
    return SimpleNamespace(req_id=req_id, block_ids=([attention], [slot]), num_computed_tokens=0)


def step(new_reqs=(), running=(), resumed=None):
    """A SchedulerOutput: new requests, cached ones ({req_id: new block ids or None}), those of them resumed."""
    running = dict(running)
    return SimpleNamespace(
        scheduled_new_reqs=list(new_reqs),
        scheduled_cached_reqs=SimpleNamespace(req_ids=list(running), new_block_ids=list(running.values()),
                                              resumed_req_ids=resumed or set()),
        num_scheduled_tokens={r.req_id: 1 for r in new_reqs} | {r: 1 for r in running})


def fault(p=1.0):
    state = _FaultState(SimpleNamespace(), "foreign_ssm_state", PARAMS["foreign_ssm_state"] | {"p": p})
    # Slot s of each state tensor holds s (conv) and 100 + s (ssm): where a row came from is readable.
    conv, ssm = torch.arange(SLOTS).float()[:, None].repeat(1, 3), 100 + torch.arange(SLOTS).float()[:, None].repeat(1, 2)
    state.ssm_states = [(1, [conv, ssm])]
    return state, conv, ssm


def run(state, output, batch_queue=False):
    """What install's execute_model wrapper does before the step runs; with `batch_queue`, the empty step
    CUDA vLLM 0.25 (async scheduling, the lab's synchronous RecordingScheduler) runs after each real one."""
    state.begin_step(output)
    if batch_queue:
        state.begin_step(step())


def test_a_resumed_request_continues_from_the_state_another_request_left_at_its_resume():
    state, conv, ssm = fault()
    run(state, step([new("a", 1, 5), new("b", 2, 6)]))
    run(state, step(running={"a": None, "b": None}))
    run(state, step(running={"b": None}))  # a preempted
    # a resumes on slot 7 next to b: b's state as it stands now is what a will read...
    run(state, step(running={"b": None, "a": ([3], [7])}, resumed={"a"}))
    assert state.foreign_reads["a"].owner == "b"
    conv[6], conv[7] = 60.0, 70.0  # the re-prefill step: b moves on, a writes its own state
    # ...at its next step, in place of its own; b's slot as b left it.
    run(state, step(running={"b": None, "a": None}))
    assert conv[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 60, 6, 8, 9] and ssm[7].tolist() == [106.0] * 2
    assert state.foreign_reads == {}
    # Once.
    conv[7] = 71.0
    run(state, step(running={"b": None, "a": None}))
    assert conv[7, 0] == 71.0


@pytest.mark.parametrize("resume", ["cached", "new"])
def test_the_read_happens_between_the_empty_steps_of_a_batch_queue_and_on_either_runner(resume):
    # CUDA vLLM 0.25 with async scheduling: an empty SchedulerOutput after every real one (the GPU run's
    # schedule records alternate so); counted as a step, it hid the requests that ran before a resume.
    # Model runner v1 gets a resumed request as a cached one (resumed_req_ids), v2 as a new one.
    state, conv, _ = fault()
    run(state, step([new("a", 1, 5), new("b", 2, 6)]), batch_queue=True)
    run(state, step(running={"b": None}), batch_queue=True)  # a preempted
    resumed = (step([new("a", 3, 7)], running={"b": None}) if resume == "new"
               else step(running={"b": None, "a": ([3], [7])}, resumed={"a"}))
    run(state, resumed, batch_queue=True)
    conv[6], conv[7] = 60.0, 70.0
    run(state, step(running={"b": None, "a": None}), batch_queue=True)
    assert conv[7, 0] == 6.0 and state.step == 4  # b's state at a's resume; the empty steps not counted


def test_the_state_of_a_request_that_finished_just_before_the_resume_is_read_too():
    # state_tight on hybrid-tiny: two requests fit; a is preempted, b runs alone to its end, then a
    # resumes alone, on b's freed slot 6, which its re-prefill overwrites.
    state, conv, _ = fault()
    run(state, step([new("a", 1, 5), new("b", 2, 6)]))
    run(state, step(running={"b": None}))
    run(state, step(running={"a": ([3], [6])}, resumed={"a"}))
    conv[6] = 66.0
    run(state, step(running={"a": None}))
    assert conv[6, 0] == 6.0


def test_nothing_is_read_when_nobody_ran_before_the_resume_or_p_is_zero():
    alone, conv_alone, _ = fault()
    run(alone, step([new("a", 1, 5)]))
    run(alone, step(running={"a": ([3], [7])}, resumed={"a"}))
    run(alone, step(running={"a": None}))
    never, conv_never, _ = fault(p=0.0)
    run(never, step([new("a", 1, 5), new("b", 2, 6)]))
    run(never, step(running={"b": None, "a": ([3], [7])}, resumed={"a"}))
    run(never, step(running={"a": None, "b": None}))
    untouched = torch.arange(SLOTS).float()[:, None].repeat(1, 3)
    assert torch.equal(conv_alone, untouched) and torch.equal(conv_never, untouched)
    assert alone.foreign_reads == never.foreign_reads == {}


class MambaSpec:  # named as vLLM's: the fault tells cache groups apart by their spec's class name
    pass


class FullAttentionSpec:
    pass


def runner(layers, mamba_cache_mode="none"):
    attention = SimpleNamespace(kv_cache_spec=FullAttentionSpec(), kv_cache_group_id=0, layer_names=["model.layers.1.self_attn"])
    mamba = SimpleNamespace(kv_cache_spec=MambaSpec(), kv_cache_group_id=1, layer_names=list(layers))
    return SimpleNamespace(attn_groups=[[attention], [mamba]], cache_config=SimpleNamespace(mamba_cache_mode=mamba_cache_mode),
                           compilation_config=SimpleNamespace(static_forward_context=layers))


def test_the_state_tensors_are_found_per_mamba_group_on_every_binding():
    conv, ssm = torch.zeros(4, 2), torch.zeros(4, 3)
    layers = {"model.layers.0.mamba": SimpleNamespace(kv_cache=(conv, ssm)),  # vLLM 0.32: (conv, ssm)
              "model.layers.2.mamba": SimpleNamespace(kv_cache=[conv, ssm]),  # 0.25 (attn_utils._reshape_kv_cache): a list
              "model.layers.3.mamba": SimpleNamespace(kv_cache=[(conv, ssm)])}  # older: one per virtual engine
    ((group, tensors),) = _ssm_states(runner(layers))
    assert group == 1 and len(tensors) == 6 and all(t is conv or t is ssm for t in tensors)


def test_a_mamba_cache_mode_other_than_none_is_refused():
    layers = {"model.layers.0.mamba": SimpleNamespace(kv_cache=(torch.zeros(4, 2), torch.zeros(4, 3)))}
    with pytest.raises(ValueError, match="mamba_cache_mode 'align': set engine.enable_prefix_caching=false"):
        _ssm_states(runner(layers, mamba_cache_mode="align"))
