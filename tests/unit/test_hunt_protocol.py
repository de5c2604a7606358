"""Contract tests for the files handed between the hunt's processes (trial event lines, case.json,
minimized.json, the known-bugs file, hunt.db), each through its one reader and writer; the request
index of a sampled completion; the budget as a hard limit on starting trials."""
import json
import sqlite3
from types import SimpleNamespace

import pytest

from rollout_lab.crash import CrashSignature
from rollout_lab.hunt.protocol import (EngineStarted, EngineStarting, Finding, Heartbeat, OracleVerdict, OutOfTime,
                                       ProtocolError, Signature, TrialFinished, TrialResult, TrialStarted, WorstToken,
                                       event_line, parse_event, read_events, read_known_bugs, write_known_bug)
from rollout_lab.hunt.store import Store, StoreError, TrialRow
from rollout_lab.minimize.handoff import CaseFile, HandoffError, MinimizedResult
from rollout_lab.minimize.standalone import Case, Expected, Request

ENGINE = {"model": "smollm2", "engine.dtype": "float32", "engine.block_size": 32}
WORKLOAD = {"generator": "many_short", "sampling.n": 2, "seed": 7}
CRASH_KEY = "RuntimeError@vllm/v1/worker/gpu_worker.py:sample_tokens|vllm/v1/worker/gpu_model_runner.py:_bookkeeping_sync"


def failing_result() -> TrialResult:
    """A mismatch trial as the runner writes it: every field off its default."""
    case = Case("smollm2", {"block_size": 32, "disable_log_stats": False}, [Request([1, 2, 3], 11, 0, 0), Request([1, 2, 3], 12, 0, 1)],
                max_tokens=8, temperature=0.7, top_p=0.9, top_k=20)
    reference = OracleVerdict(40, 3, 2.5, "preempted", WorstToken(2.5, 1, 4, 1234))
    alone = OracleVerdict(8, 0, 1e-7, None, None, requests=1, identical=0, promised=False, first_token_diff=3)
    return TrialResult("fail", seconds=3.5, dtype="float32", oracles={"reference": reference, "metamorphic": OracleVerdict(40),
                       "batch_invariance": alone}, num_requests=2, num_aborted=1, num_tokens=40, preempted_requests=1,
                       cached_requests=1, batch=False, phase_seconds={"engine": 1.0}, case=case)


def crash_result() -> TrialResult:
    crash = CrashSignature("RuntimeError", "boom", CRASH_KEY.split("@")[1].split("|"), "generate", None, "Traceback ...")
    return TrialResult("crash", seconds=1.0, dtype="bfloat16", crash=crash, case=failing_result().case)


@pytest.mark.parametrize("text", [
    CRASH_KEY, "ProcessDied@no-vllm-frame", "hang@trial:smollm2", "died@engine_start:/models/my:model",
    "mismatch/reference:smollm2:float32:preempted", "mismatch/batch_invariance:hybrid-tiny:bfloat16:any",
])
def test_a_signature_prints_as_it_parses(text):
    assert str(Signature.parse(text)) == text
    assert Signature.parse(text) == Signature.parse(str(Signature.parse(text)))


def test_a_signatures_parts_are_fields_not_string_splits():
    sig = Signature.parse("mismatch/metamorphic:smollm2:bfloat16:prefix_cached")
    assert (sig.kind, sig.oracle, sig.model, sig.dtype, sig.request_class) == ("mismatch", "metamorphic", "smollm2", "bfloat16", "prefix_cached")
    assert Signature.parse(CRASH_KEY).crash_key == CRASH_KEY and Signature.parse(CRASH_KEY).kind == "crash"
    for bad in ["", "nothing", "mismatch/reference:smollm2", "@frames"]:
        with pytest.raises(ProtocolError, match="is not a hunt signature"):
            Signature.parse(bad)


EVENTS = [
    EngineStarting("g1", {"block_size": 32, "disable_log_stats": False}),
    EngineStarted("g1", "ok", 4.2, "float32", 640),
    EngineStarted("g1", "crash", 1.0, crash=crash_result().crash, message="boom"),
    TrialStarted("g1", "t1"),
    Heartbeat("g1", 17),
    TrialFinished("g1", "t1", WORKLOAD, failing_result()),
    TrialFinished("g1", "t2", WORKLOAD, crash_result()),
    TrialFinished("g1", "t3", WORKLOAD, TrialResult("rejected", seconds=0.1, message="n > 1 needs sampling")),
    OutOfTime("g1", "t4"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_trial_event_round_trips_through_its_line(event):
    line = event_line(event)
    assert line.endswith("\n") and line.count("\n") == 1
    assert parse_event(line) == event


def test_the_lines_reader_returns_complete_lines_only_and_resumes_from_the_offset(tmp_path):
    path = tmp_path / "group_0000.jsonl"
    whole, cut = event_line(EVENTS[3]), event_line(EVENTS[5])
    path.write_text(whole + cut[:40])  # the writer was killed mid-line
    events, offset = read_events(path, 0)
    assert events == [EVENTS[3]] and offset == len(whole.encode())
    with path.open("a") as f:
        f.write(cut[40:])
    events, offset = read_events(path, offset)
    assert events == [EVENTS[5]] and offset == path.stat().st_size
    assert read_events(tmp_path / "missing.jsonl", 0) == ([], 0)
    with pytest.raises(ProtocolError, match="not a hunt event line"):
        parse_event('{"event": "nope", "group": "g"}')


def test_a_case_file_round_trips_and_the_minimizer_reads_what_the_hunt_writes(tmp_path):
    from rollout_lab.hunt.repros import case_file
    from rollout_lab.minimize.predicate import load_case

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    finding = Finding(Signature.parse("mismatch/reference:smollm2:float32:preempted"), "t1", 5.0, 1, 1,
                      ENGINE | {"model": str(model_dir)}, WORKLOAD, failing_result())
    written = case_file(finding, {"float32": 1e-3}, "stale_state", {"p": 0.5})
    assert written.expected == Expected("mismatch", 1e-3, request_class="preempted")
    assert written.case.fault == "stale_state" and written.case.requests == failing_result().case.requests
    path = written.write(tmp_path / "findings" / "f00" / "case.json")
    assert CaseFile.read(path) == written
    run = load_case(path)
    assert run.case.model == str(model_dir.resolve()) and run.case.requests == written.case.requests
    assert run.expected == written.expected and run.config.fault.name == "stale_state"
    assert case_file(finding, {"float32": 1e-3}, None, {"p": 0.5}).case.fault_params == {}
    (tmp_path / "bad.json").write_text('{"model": "x"}')
    with pytest.raises(HandoffError, match="bad.json is not a case file"):
        CaseFile.read(tmp_path / "bad.json")


def test_a_minimized_case_file_keeps_its_warm_up(tmp_path):
    """The minimizer's case.json of a history-dependent case: the localizer must replay its warm-up first."""
    from rollout_lab.minimize.predicate import load_case
    from rollout_lab.minimize.standalone import Request

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    case = failing_result().case
    case.model, case.warmup, case.warmup_max_tokens = str(model_dir), [Request([5, 6, 7], 3, 0, 0), Request([8], 4, 1, 0)], 16
    written = CaseFile(str(model_dir), case, Expected("mismatch", 1e-3), "minimized from a run")
    run = load_case(written.write(tmp_path / "repro" / "case.json"))
    assert run.case.warmup == case.warmup and run.case.warmup_max_tokens == 16 and run.origin == "case file"


def test_a_crash_case_keeps_the_crash_key_and_the_trials_requests():
    from rollout_lab.hunt.repros import case_file

    finding = Finding(Signature.parse(CRASH_KEY), "t2", 5.0, 1, 1, ENGINE | {"engine.dtype": "bfloat16"}, WORKLOAD, crash_result())
    written = case_file(finding, {"bfloat16": 1.5}, None, {})
    assert written.expected == Expected("crash", 1.5, crash_key=CRASH_KEY)
    assert written.case.requests == crash_result().case.requests and written.model == "smollm2"


def test_a_minimized_result_round_trips_through_minimized_json(tmp_path):
    result = MinimizedResult({"block_size": 16, "enable_prefix_caching": True}, ["block_size"], "5 prompts", "1 prompt",
                             68, 242.0, steps_back=1, verify_args=["--model", "smollm2"])
    path = result.write(tmp_path)
    assert path.name == "minimized.json" and MinimizedResult.read(tmp_path) == result
    with pytest.raises(HandoffError, match="is not a minimization result"):
        MinimizedResult.read(tmp_path / "missing")


def test_the_known_bugs_file_round_trips_and_names_only_crashes(tmp_path):
    bug = tmp_path / "repro" / "seeded"
    bug.mkdir(parents=True)
    (bug / "repro.py").write_text("")
    write_known_bug(bug, Signature.parse(CRASH_KEY))
    assert read_known_bugs(tmp_path / "repro") == {Signature.parse(CRASH_KEY): bug / "repro.py"}
    assert read_known_bugs(tmp_path / "missing") == {} and read_known_bugs(None) == {}
    write_known_bug(bug, Signature.parse("mismatch/reference:smollm2:float32:any"))
    with pytest.raises(ProtocolError, match="not a crash signature"):
        read_known_bugs(tmp_path / "repro")
    (bug / "signature.txt").write_text("nonsense\n")
    with pytest.raises(ProtocolError, match="seeded/signature.txt: 'nonsense' is not a hunt signature"):
        read_known_bugs(tmp_path / "repro")


def test_a_finding_round_trips_through_the_store_and_a_corrupt_store_is_refused(tmp_path):
    store = Store(tmp_path / "hunt.db")
    finding = Finding(Signature.parse("mismatch/reference:smollm2:float32:preempted"), "t1", 10.0, 1, 2, ENGINE, WORKLOAD,
                      failing_result(), state="verified", trigger=["block_size", "fault=stale_state"],
                      repro="repro/f00/repro.py", repro_rate="5/5", needs_planted_fault=True,
                      minimized=MinimizedResult({"block_size": 32}, ["block_size"], "a", "b", 3, 1.0), verify_exits=[1] * 5,
                      no_fault_exit=0)
    store.put_finding(finding)
    store.add_group(0, "g", ENGINE, "explore", 1.0)
    row = TrialRow("t1", 0, ENGINE, WORKLOAD, "fail", finding.signature, failing_result(), 3.5, 10.0)
    store.add_trial(row)
    store.set_meta("elapsed_s", 12.5)
    again = Store(tmp_path / "hunt.db")
    assert again.finding(finding.signature) == finding and again.findings() == [finding]
    assert again.trials() == [row] and again.trial_keys() == {"t1"} and again.next_group_index() == 1
    assert again.meta("elapsed_s") == 12.5
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="bad.db is not a readable hunt store"):
        Store(bad)
    newer = tmp_path / "newer.db"
    sqlite3.connect(newer, isolation_level=None).executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT); INSERT INTO meta VALUES ('schema_version', '3');")
    with pytest.raises(StoreError, match="newer.db has schema version 3; this rollout_lab reads 2"):
        Store(newer)


def test_the_request_index_of_a_completion_is_its_requests_not_its_position_among_completions():
    """LLM.generate numbers requests from a counter that runs on across calls; with n > 1 each
    request holds n completions. The seed recorded for a completion (and put in the case) is its request's."""
    from rollout_lab.engine import sampled_outputs
    from rollout_lab.hunt.runner import collect
    from rollout_lab.hunt.trace import request_seed

    def output(request_id, prompt):
        completion = SimpleNamespace(token_ids=[5], logprobs=[{5: SimpleNamespace(logprob=-1.0)}], finish_reason="length", text="")
        return SimpleNamespace(request_id=request_id, prompt_token_ids=prompt, outputs=[completion, completion],
                               num_cached_tokens=0, metrics=None)

    workload = {"seed": 3, "sampling.n": 2}
    items = collect(sampled_outputs([output("12", [1]), output("13", [2]), output("14", [3])]), workload)
    assert [(s.request, s.completion) for s in items] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [s.seed for s in items[::2]] == [request_seed(workload, i) for i in range(3)]
    # A step-driven trace names its requests "<trial>-<index>"; an aborted one leaves a gap.
    stepped = collect(sampled_outputs([output("t-0", [1]), output("t-2", [3])]), workload)
    assert [s.request for s in stepped] == [0, 0, 2, 2]


def test_no_trial_starts_once_the_deadline_has_passed_but_the_one_in_flight_finishes(tmp_path):
    from rollout_lab.hunt.runner import GroupSpec, Lines, run_trials

    now = [100.0]
    started = []

    def run_one(i, trial, workload):
        started.append(trial)
        now[0] += 30.0  # each trial takes 30 s
        return TrialResult("ok")

    spec = GroupSpec("g", ENGINE, "/m", [(f"t{i}", WORKLOAD) for i in range(12)], deadline=150.0)
    lines = Lines(tmp_path / "g.jsonl")
    run_trials(spec, lines, run_one, clock=lambda: now[0])
    # t0 starts at 100, t1 at 130 (in budget, finishes at 160); t2 would start at 160: not started.
    assert started == ["t0", "t1"]
    events = read_events(lines.path, 0)[0]
    assert [type(e).__name__ for e in events] == ["TrialStarted", "TrialFinished"] * 2 + ["OutOfTime"]
    assert events[-1] == OutOfTime("g", "t2")
    # A crash ends the group: the engine is in no known state.
    crashing = GroupSpec("g", ENGINE, "/m", [("c0", WORKLOAD), ("c1", WORKLOAD)], deadline=1e12)
    run_trials(crashing, Lines(tmp_path / "c.jsonl"), lambda i, t, w: crash_result(), clock=lambda: 0.0)
    assert [e.trial for e in read_events(tmp_path / "c.jsonl", 0)[0] if isinstance(e, TrialStarted)] == ["c0"]



V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE groups (idx INTEGER PRIMARY KEY, key TEXT, engine TEXT, reason TEXT, status TEXT, message TEXT,
    engine_seconds REAL, started REAL);
CREATE TABLE trials (key TEXT PRIMARY KEY, group_idx INTEGER, engine TEXT, workload TEXT, status TEXT,
    signature TEXT, oracles TEXT, result TEXT, seconds REAL, elapsed REAL);
CREATE TABLE findings (signature TEXT PRIMARY KEY, kind TEXT, first_trial TEXT, first_elapsed REAL, first_trial_number INTEGER,
    trials INTEGER, model TEXT, dtype TEXT, trigger TEXT, repro TEXT, repro_rate TEXT, state TEXT, detail TEXT);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_hunt_dir_of_schema_1_is_rewritten_in_place_and_resumes(tmp_path):
    """A hunt started before the typed records (the GPU hunt kept in docs/gpu_runs, say) goes on."""
    import json

    engine = json.dumps(ENGINE)
    verdict = {"tokens": 40, "flagged": 3, "max": 2.5, "class": "preempted", "worst": {"diff": 2.5, "request": 1, "position": 4, "token_id": 9}}
    fail = {"event": "result", "trial": "t1", "point": WORKLOAD, "status": "fail", "seconds": 3.5, "dtype": "float32",
            "oracles": {"reference": verdict, "metamorphic": {"tokens": 40, "flagged": 0, "max": 1e-5, "class": None, "worst": None}},
            "failed_oracles": ["reference"], "num_requests": 2, "num_tokens": 40, "preempted_requests": 1, "batch": True, "time": 1.0,
            "case": {"requests": [{"prompt_token_ids": [1, 2], "seed": 11, "prompt_index": 0, "sample_index": 0}],
                     "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 20}}
    crash = crash_result().crash.to_dict()
    died = {"status": "crash", "phase": "trial", "crash": {"key": "ProcessDied@trial", "message": "killed"}}
    db = sqlite3.connect(tmp_path / "hunt.db", isolation_level=None)
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO groups VALUES (0, 'g0', ?, 'explore', 'crash', '', 4.0, 1.0)", (engine,))
    db.execute("INSERT INTO groups VALUES (1, 'g1', ?, 'explore', 'running', NULL, NULL, 2.0)", (engine,))
    for key, status, signature, result in [("t1", "fail", "mismatch/reference:smollm2:float32:preempted", fail),
                                           ("t2", "crash", crash["key"], {"status": "crash", "crash": crash}),
                                           ("t3", "crash", "ProcessDied@trial", died)]:
        db.execute("INSERT INTO trials VALUES (?, 0, ?, ?, ?, ?, '{}', ?, 1.0, 5.0)",
                   (key, engine, json.dumps(WORKLOAD), status, signature, json.dumps(result)))
    detail = {"engine": ENGINE, "workload": WORKLOAD, "result": fail,
              "minimized": {"engine_args": {"block_size": 32}, "knobs": ["block_size"], "before": "a", "after": "b", "runs": 3,
                            "seconds": 1.0, "steps_back": None, "verify_args": []}, "verify_exits": [1, 1]}
    db.execute("INSERT INTO findings VALUES ('mismatch/reference:smollm2:float32:preempted', 'mismatch', 't1', 5.0, 1, 1, "
               "'smollm2', 'float32', '[\"block_size\"]', ?, '2/2', 'verified', ?)",
               (str(tmp_path / "repro" / "f00" / "repro.py"), json.dumps(detail)))
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "group_0001.jsonl").write_text(
        json.dumps({"event": "engine", "group": "g1", "status": "ok", "seconds": 4.0, "dtype": "float32", "blocks": 10}) + "\n"
        + json.dumps({"event": "start", "group": "g1", "trial": "t4"}) + "\n"
        + json.dumps(fail | {"trial": "t4"}) + "\n" + '{"event": "beat", "gro')
    db.close()

    store = Store(tmp_path / "hunt.db")
    assert store.meta("schema_version") == 2
    rows = {t.key: t for t in store.trials()}
    assert rows["t1"].result.oracles["reference"] == OracleVerdict(40, 3, 2.5, "preempted", WorstToken(2.5, 1, 4, 9))
    assert rows["t1"].result.case.requests == [Request([1, 2], 11, 0, 0)] and rows["t1"].result.case.model == "smollm2"
    assert rows["t2"].result.crash == crash_result().crash and str(rows["t2"].signature) == crash["key"]
    assert (rows["t3"].status, str(rows["t3"].signature)) == ("died", "died@trial:smollm2")
    [finding] = store.findings()
    assert finding.repro == "repro/f00/repro.py" and finding.minimized.knobs == ["block_size"] and finding.verify_exits == [1, 1]
    events = read_events(tmp_path / "lines" / "group_0001.jsonl", 0)[0]
    assert [type(e).__name__ for e in events] == ["EngineStarted", "TrialStarted", "TrialFinished"]
    assert events[0].num_blocks == 10 and events[2].result.oracles["reference"].max_diff == 2.5
    assert Store(tmp_path / "hunt.db").trials() == store.trials()  # migrated once


def test_fault_params_are_checked_against_the_faults_schema_on_both_sides_of_the_handoff(tmp_path):
    """Defect: case_file and CaseFile.read took any fault parameter (a fixture used `stale_after`,
    which no fault has): the minimizer then planted a fault other than the hunt's, or none."""
    from rollout_lab.config import ConfigError
    from rollout_lab.hunt.repros import case_file

    finding = Finding(Signature.parse("mismatch/reference:smollm2:float32:preempted"), "t1", 5.0, 1, 1,
                      ENGINE | {"model": "smollm2"}, WORKLOAD, failing_result())
    with pytest.raises(ConfigError, match=r"^fault stale_state has no parameter stale_after; it takes p, seed$"):
        case_file(finding, {"float32": 1e-3}, "stale_state", {"stale_after": 3})
    with pytest.raises(ConfigError, match=r"^fault stale_state parameter p='often' is not a number$"):
        case_file(finding, {"float32": 1e-3}, "stale_state", {"p": "often"})
    written = case_file(finding, {"float32": 1e-3}, "stale_state", {"p": 0.5})
    assert written.case.fault_params == {"p": 0.5, "seed": 0}
    path = written.write(tmp_path / "case.json")
    data = json.loads(path.read_text())
    data["case"]["fault_params"]["stale_after"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(HandoffError, match=r"case.json: fault stale_state has no parameter stale_after; it takes p, seed$"):
        CaseFile.read(path)
