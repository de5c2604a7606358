"""A case carries its schedule: each request's arrival and abort step survive the hand-offs, the
minimizer and repro.py step the engine on the same clock, and the reduction shrinks the schedule."""
import hashlib
import json
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest

from rollout_lab import stepping
from rollout_lab.hunt.trace import request_seed, trace_requests
from rollout_lab.hunt.workloads import TraceRequest
from rollout_lab.minimize import schedule
from rollout_lab.minimize.handoff import CaseFile, case_from_json
from rollout_lab.minimize.script import LINE_BUDGET, SCHEDULE_LINES, ReproSpec, budget_lines, repro_source
from rollout_lab.minimize.standalone import Case, Expected, Request, completed, is_scheduled
from rollout_lab.minimize.trials import TrialRecord, case_key

STAGGERED = [Request([1, 2, 3], 11, 0, 0, arrive_step=0, abort_step=3), Request([4, 5], 12, 1, 0),
             Request([6], 13, 2, 0, arrive_step=7)]


def case(requests=STAGGERED) -> Case:
    return Case("llama-tiny", {"dtype": "float32", "disable_log_stats": False}, list(requests), max_tokens=4)


def test_the_schedule_round_trips_through_case_json_and_the_reduction_log(tmp_path):
    written = CaseFile("llama-tiny", case(), Expected("mismatch", 1e-3, request_class="any"), "hunt trial t")
    read = CaseFile.read(written.write(tmp_path / "case.json"))
    assert read == written
    assert [(r.arrive_step, r.abort_step) for r in read.case.requests] == [(0, 3), (0, None), (7, None)]
    record = TrialRecord(1, "k", 0, "schedule", "c", {}, True, {}, 1.0, case=asdict(case()))
    assert TrialRecord(**json.loads(json.dumps(asdict(record)))).candidate() == case()


def test_a_case_without_a_schedule_keeps_the_key_it_was_logged_with():
    """A resumed minimization finds the trials logged before requests had a schedule."""
    expected = Expected("mismatch", 1e-3, request_class="any")
    plain = case([Request([1, 2], 5, 0, 0)])
    fields = asdict(plain)
    del fields["warmup"], fields["warmup_max_tokens"]
    fields["requests"] = [{"prompt_token_ids": [1, 2], "seed": 5, "prompt_index": 0, "sample_index": 0}]
    old = hashlib.sha256(json.dumps({"case": fields, "expected": asdict(expected)}, sort_keys=True).encode()).hexdigest()[:16]
    assert case_key(plain, expected) == old
    assert case_key(case(), expected) != case_key(schedule.all_at_once(case()), expected)


def test_a_step_driven_trace_becomes_requests_at_its_steps_each_completion_seeded_as_vllm_does():
    trace = [TraceRequest([1, 2], arrive_step=0, abort_after=2), TraceRequest([3], arrive_step=5)]
    workload = {"seed": 4, "sampling.n": 2}
    requests = trace_requests(trace, workload)
    assert [(r.prompt_index, r.sample_index, r.arrive_step, r.abort_step) for r in requests] == [
        (0, 0, 0, 2), (0, 1, 0, 2), (1, 0, 5, None), (1, 1, 5, None)]
    assert [r.seed for r in requests] == [request_seed(workload, 0), request_seed(workload, 0) + 1,
                                          request_seed(workload, 1), request_seed(workload, 1) + 1]
    assert not is_scheduled(trace_requests([TraceRequest([1]), TraceRequest([2])], workload))


class FakeEngine:
    """LLM.llm_engine's request API on a toy engine: a request finishes after max_tokens steps."""

    def __init__(self):
        self.left, self.steps, self.log = {}, 0, []

    def add_request(self, request_id, prompt, params):
        self.left[request_id] = (params.max_tokens, prompt["prompt_token_ids"])
        self.log.append(("add", request_id.rsplit("-", 1)[1], self.steps))

    def step(self):
        self.steps += 1
        done = []
        for request_id, (left, prompt) in list(self.left.items()):
            if left == 1:
                del self.left[request_id]
                completion = SimpleNamespace(token_ids=[7], logprobs=[{7: SimpleNamespace(logprob=-1.0)}], finish_reason="length", text="")
                done.append(SimpleNamespace(request_id=request_id, prompt_token_ids=prompt, outputs=[completion], finished=True,
                                            num_cached_tokens=0, metrics=None))
            else:
                self.left[request_id] = (left - 1, prompt)
        return done

    def abort_request(self, request_ids):
        self.log.append(("abort", [i.rsplit("-", 1)[1] for i in request_ids], self.steps))
        for request_id in request_ids:
            del self.left[request_id]

    def has_unfinished_requests(self):
        return bool(self.left)


def test_repro_py_steps_the_engine_as_the_minimizer_replays_the_case():
    """The emitted run_schedule and stepping.drive add and abort each request at the same engine step."""
    arrivals, aborts = [0, 0, 9, 2], [3, None, None, None]
    params = [SimpleNamespace(max_tokens=n) for n in (6, 5, 2, 1)]
    prompts = [[1], [2], [3], [4]]
    lab = SimpleNamespace(llm_engine=FakeEngine())
    outputs, aborted = stepping.drive(lab, prompts, params, arrivals, aborts, "t")
    # Request 0 is aborted after step 3; the engine goes idle after step 4 and skips ahead to step 9.
    assert lab.llm_engine.log == [("add", "0", 0), ("add", "1", 0), ("add", "3", 2), ("abort", ["0"], 4), ("add", "2", 5)]
    assert aborted == [0] and [o.request_id for o in outputs] == ["t-1", "t-2", "t-3"]

    spec = ReproSpec("[Bug]: x", "y", "smollm2", case([Request(p, 1, i, 0, a, b) for i, (p, a, b) in enumerate(zip(prompts, arrivals, aborts))]),
                     Expected("mismatch", 1e-3, request_class="any"))
    namespace = {}
    exec(compile(repro_source(spec), "repro.py", "exec"), namespace)
    script = SimpleNamespace(llm_engine=FakeEngine())
    kept = namespace["run_schedule"](script, [{"prompt_token_ids": p} for p in prompts], params, namespace["SCHEDULE"])
    assert script.llm_engine.log == lab.llm_engine.log
    assert [o.request_id for o in kept] == ["r-1", "r-2", "r-3"]


def test_a_request_that_finishes_before_its_abort_is_not_returned_so_outputs_pair_with_the_completed_requests():
    """Defect (the 0.33 GPU hunt, docs/gpu_runs/2026-12-07c): a request that finished before its abort step came
    back from the replay, but batch_invariance re-ran only the requests with no abort step and compared the two
    lists by position, so each pair held two different requests and the minimized repro "reproduced" that."""
    arrivals, aborts = [0, 0, 0], [5, None, None]
    params = [SimpleNamespace(max_tokens=n) for n in (2, 3, 4)]  # request 0 finishes at step 2, before its abort at 5
    prompts = [[1], [2], [3]]
    lab = SimpleNamespace(llm_engine=FakeEngine())
    outputs, aborted = stepping.drive(lab, prompts, params, arrivals, aborts, "t")
    requests = [Request(p, 1, i, 0, a, b) for i, (p, a, b) in enumerate(zip(prompts, arrivals, aborts))]
    assert aborted == [] and [o.request_id for o in outputs] == ["t-1", "t-2"]
    assert [r.prompt_token_ids for r in completed(case(requests))] == [o.prompt_token_ids for o in outputs]
    spec = ReproSpec("[Bug]: x", "y", "smollm2", case(requests), Expected("batch_invariance", 0.0, targets=2))
    namespace = {}
    exec(compile(repro_source(spec), "repro.py", "exec"), namespace)
    kept = namespace["run_schedule"](SimpleNamespace(llm_engine=FakeEngine()), [{"prompt_token_ids": p} for p in prompts],
                                     params, namespace["SCHEDULE"])
    assert [o.request_id for o in kept] == ["r-1", "r-2"]


@pytest.mark.parametrize("kind", ["crash", "mismatch", "batch_invariance"])
def test_a_scheduled_repro_compiles_steps_the_engine_and_fits_its_budget(kind):
    expected = {"crash": Expected("crash", 1e-3, crash_key="RuntimeError@vllm/v1/a.py:f"),
                "mismatch": Expected("mismatch", 1e-3, request_class="any"),
                "batch_invariance": Expected("batch_invariance", 0.0, targets=2)}[kind]
    source = repro_source(ReproSpec("[Bug]: x", "y", "hybrid-tiny", case(), expected))
    compile(source, "repro.py", "exec")
    assert "SCHEDULE = [(0, 3), (0, None), (7, None)]" in source and "run_schedule(llm, " in source
    assert budget_lines(source) <= LINE_BUDGET[kind] + SCHEDULE_LINES, budget_lines(source)
    plain = repro_source(ReproSpec("[Bug]: x", "y", "hybrid-tiny", schedule.all_at_once(case()), expected))
    assert "run_schedule" not in plain and "SCHEDULE" not in plain
    assert budget_lines(source) - budget_lines(plain) <= SCHEDULE_LINES


def abort_then_arrival(candidate: Case) -> bool:
    """abort_then_arrival's trigger: a request aborted, then one arriving after the abort while a third runs."""
    requests = candidate.requests
    return any(a.abort_step is not None and b.arrive_step > a.abort_step and c.abort_step is None and c.arrive_step <= a.abort_step
               for a in requests for b in requests for c in requests if len({id(a), id(b), id(c)}) == 3)


def test_the_reduction_keeps_the_abort_and_the_arrival_after_it_and_closes_the_gaps():
    staggered = case([Request([1], 1, 0, 0, 0, 4), Request([2], 2, 1, 0, 0, 9), Request([3], 3, 2, 0, 2),
                      Request([4], 4, 3, 0, 0), Request([5], 5, 4, 0, 12)])
    tried = []

    def fails(candidate, stage, change):
        tried.append(change)
        return abort_then_arrival(candidate)

    reduced = schedule.reduce_schedule(staggered, fails)
    assert tried[0] == "all at once: every arrival at step 0, no abort"
    assert abort_then_arrival(reduced)
    assert len(schedule.aborted(reduced)) == 1  # one abort is enough
    assert schedule.widest_gap(reduced) == 1  # every gap closed to one step
    assert schedule.describe(reduced) == "arrivals at steps [0, 2], 1 aborted"


def test_a_schedule_that_does_not_matter_goes_all_at_once_in_one_trial():
    tried = []
    reduced = schedule.reduce_schedule(case(), lambda candidate, stage, change: tried.append(change) or True)
    assert not is_scheduled(reduced.requests) and len(tried) == 1
    assert schedule.reduce_schedule(schedule.all_at_once(case()), lambda *a: pytest.fail("no trial")) == schedule.all_at_once(case())


def test_capped_gaps_keep_every_event_in_order():
    capped = schedule.with_gaps_capped(replace(case(), requests=[Request([1], 1, 0, 0, 3, 10), Request([2], 2, 1, 0, 11)]), 1)
    assert [(r.arrive_step, r.abort_step) for r in capped.requests] == [(0, 1), (2, None)]
    assert case_from_json(asdict(capped)) == capped
