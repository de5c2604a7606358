"""The seeds a hunt trial's case replays are the ones its requests were sent with (None: the engine's RNG)."""
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from rollout_lab.engine import sampled_outputs
from rollout_lab.hunt.runner import collect, failing_requests
from rollout_lab.hunt.trace import request_seed, trace_params, trace_requests
from rollout_lab.hunt.space import Space, SpaceConfig
from rollout_lab.hunt.workloads import Limits, make_trace

CONF = Path(__file__).resolve().parents[2] / "conf" / "hunt"


def output(request_id: str, prompt: list[int], n: int):
    completion = SimpleNamespace(token_ids=[5], logprobs=[{5: SimpleNamespace(logprob=-1.0)}], finish_reason="length", text="")
    return SimpleNamespace(request_id=request_id, prompt_token_ids=prompt, outputs=[completion] * n,
                           num_cached_tokens=0, metrics=None)


def test_a_failing_trials_case_keeps_each_completions_seed_and_no_seed_stays_none():
    """Defect: the case of a failing trial replayed an engine-RNG request (seed None) with an
    invented seed `i + completion`: the minimizer then sampled other tokens than the trial did."""
    seeded = {"seed": 3, "sampling.n": 2}
    items = collect(sampled_outputs([output("12", [1], 2), output("13", [2], 2)]), seeded)
    # vLLM seeds the k-th of n completions with seed + k (ParentRequest's child sampling params).
    assert [r.seed for r in failing_requests(items)] == [request_seed(seeded, 0), request_seed(seeded, 0) + 1,
                                                          request_seed(seeded, 1), request_seed(seeded, 1) + 1]
    unseeded = seeded | {"sampling.per_request_seed": False}
    items = collect(sampled_outputs([output("12", [1], 2), output("13", [2], 2)]), unseeded)
    assert [(r.seed, r.prompt_index, r.sample_index) for r in failing_requests(items)] == [
        (None, 0, 0), (None, 0, 1), (None, 1, 0), (None, 1, 1)]


def test_a_crashed_trials_case_keeps_the_seeds_it_sent_a_real_seed_0_included():
    """Defect: `request_seed(...) or j` gave an engine-RNG request (seed None) the seed j, and would
    rewrite a real seed 0 the same way."""
    trace = make_trace("many_short", 1, list(range(100, 400)), Limits(256, 256, 32), 8)
    unseeded = {"seed": 0, "sampling.per_request_seed": False}
    assert [r.seed for r in trace_requests(trace, unseeded)] == [None] * len(trace)
    seeded = {"seed": 0}
    assert [r.seed for r in trace_requests(trace, seeded)] == [p.seed for p in trace_params(trace, seeded)]
    assert trace_requests(trace, seeded)[0].seed == 0


@pytest.mark.parametrize("space_file", ["default.yaml", "gpu.yaml"])
def test_the_unseeded_path_of_the_shipped_spaces_replays_from_the_engines_rng(space_file):
    """Half of the default and gpu spaces' workloads draw per_request_seed false: every request of
    such a trial goes to vLLM without a seed, and its case (failing or crashed) keeps None."""
    space = Space.from_config(OmegaConf.to_object(OmegaConf.merge(
        OmegaConf.structured(SpaceConfig), OmegaConf.load(CONF / space_file)["space"])), gpus=0)
    assert False in space.sampling["per_request_seed"]
    pool = list(range(100, 2100))
    for generator in space.generators:
        workload = {"generator": generator, "seed": 11, "sampling.per_request_seed": False, "sampling.n": 2,
                    "sampling.max_tokens": 8, "sampling.temperature": 1.0}
        trace = make_trace(generator, 11, pool, Limits(1024, 1024, 32), 8)
        assert [p.seed for p in trace_params(trace, workload)] == [None] * len(trace), generator
        outputs = [output(f"t-{i}", r.prompt_token_ids, 2) for i, r in enumerate(trace)]
        assert {r.seed for r in failing_requests(collect(sampled_outputs(outputs), workload))} == {None}, generator
        assert {r.seed for r in trace_requests(trace, workload)} == {None}, generator
