"""One trial: its requests sampled after the free queue moves to the case's head; its outcome from
vLLM's outputs (a preemption count vLLM does not keep stays unknown)."""
from types import SimpleNamespace

from rollout_lab import compat, engine
from rollout_lab.minimize import standalone
from rollout_lab.minimize.standalone import Case, Expected, Request


def output(token_ids, logprob, cached, preemptions):
    """A RequestOutput as vLLM returns it; metrics None is a vLLM that keeps no per-request count."""
    completion = SimpleNamespace(token_ids=token_ids, logprobs=[{t: SimpleNamespace(logprob=logprob)} for t in token_ids],
                                 finish_reason="length", text="")
    metrics = None if preemptions is None else SimpleNamespace(num_preemptions=preemptions)
    return SimpleNamespace(request_id="0", prompt_token_ids=[1, 2], outputs=[completion], num_cached_tokens=cached, metrics=metrics)


def run(monkeypatch, outputs, keeps_counts):
    case = Case("m", {}, [Request([1, 2], None) for _ in outputs], max_tokens=2)
    # The records as engine.generate reads them: its one preemption reader is under test too.
    monkeypatch.setattr(standalone, "sample", lambda llm, case: engine.sampled_outputs(outputs))
    # The reference agrees with vLLM to -1.0 on every token: a request at -2.0 is flagged.
    monkeypatch.setattr("rollout_lab.reference.reference_logprobs", lambda model, sequences: [[-1.0] * len(c) for _, c in sequences])
    monkeypatch.setattr(compat, "keeps_request_preemptions", lambda: keeps_counts)
    return standalone.run_case(None, None, case, Expected("mismatch", 1e-3, request_class="any"))


def test_unknown_preemption_counts_are_counted_as_unknown_not_as_not_preempted(monkeypatch):
    outcome = run(monkeypatch, [output([5, 6], -2.0, 0, None), output([7, 8], -1.0, 16, None)], keeps_counts=False)
    assert outcome.num_flagged == 2 and outcome.request_class == "any"
    assert (outcome.num_preempted_requests, outcome.num_unknown_preemptions) == (0, 2)
    assert outcome.describe() == "2/4 tokens flagged, max diff 1 on 'any' requests (preemptions unknown for 2/2 requests)"
    assert all(d.num_preemptions is None for d in outcome.worst)


def test_known_counts_say_how_many_requests_were_preempted(monkeypatch):
    outcome = run(monkeypatch, [output([5, 6], -2.0, 0, 1), output([7, 8], -1.0, 16, 0)], keeps_counts=True)
    assert outcome.request_class == "preempted" and outcome.num_unknown_preemptions == 0
    assert outcome.describe().endswith("(1/2 requests preempted)")



def test_a_case_is_sampled_after_its_free_queue_is_moved_to_its_block_pool_head(monkeypatch):
    calls = []
    monkeypatch.setattr(standalone.pressure, "move_pool_head", lambda llm, fraction: calls.append(("head", fraction)))
    monkeypatch.setattr(engine, "generate", lambda llm, prompts, params: calls.append(("generate", len(prompts))) or [])
    standalone.sample(None, Case("m", {}, [Request([1, 2], 0)] * 3, max_tokens=2, block_pool_head=0.8))
    standalone.sample(None, Case("m", {}, [Request([1, 2], 0)], max_tokens=2))
    # pressure.move_pool_head, the RL job's own, leaves the queue as it is for None.
    assert calls == [("head", 0.8), ("generate", 3), ("head", None), ("generate", 1)]
