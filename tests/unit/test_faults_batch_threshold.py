"""batch_threshold's trigger, on a stand-in model runner: logits of a step with fewer than
min_batch scheduled requests are left exact, those of a step with min_batch or more are noised."""
from types import SimpleNamespace

import torch

from rollout_lab.config import fault_params
from rollout_lab.faults import install


def step(requests: int):
    """A SchedulerOutput as the fault reads it: `requests` decoding requests, no new or resumed one."""
    ids = [f"r{i}" for i in range(requests)]
    cached = SimpleNamespace(resumed_req_ids=set(), req_ids=ids, new_block_ids=[None] * requests)
    return SimpleNamespace(num_scheduled_tokens={i: 1 for i in ids}, scheduled_new_reqs=[], scheduled_cached_reqs=cached)


def test_logits_are_noised_only_in_steps_that_schedule_min_batch_requests():
    exact = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    model = SimpleNamespace(compute_logits=lambda hidden: exact.clone())
    runner = SimpleNamespace(model=model, attn_groups=[])
    runner.execute_model = lambda scheduler_output: runner.model.compute_logits(None)
    params = fault_params("batch_threshold", {"min_batch": 3, "scale": 0.5})
    assert params == {"min_batch": 3, "scale": 0.5, "seed": 0}
    install(SimpleNamespace(model_runner=runner), "batch_threshold", params)

    assert torch.equal(runner.execute_model(step(2)), exact)
    noised = runner.execute_model(step(3)) - exact
    assert noised.abs().min() > 0 and 0.2 < noised.std() < 1.0
    assert torch.equal(runner.execute_model(step(1)), exact)
