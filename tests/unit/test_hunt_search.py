"""The hunt's search: coverage bookkeeping, seeded reproducibility, exploitation, dedup keys, store resume."""
from pathlib import Path
import random

import pytest

from rollout_lab.config import ConfigError
from rollout_lab.hunt.__main__ import behaviours, read_lines, signature_of
from rollout_lab.hunt.search import Coverage, Planner
from rollout_lab.hunt.space import Space, SpaceConfig, engine_args, point_key, sampling_args, with_pressure
from rollout_lab.hunt.store import Finding, Store, StoreError
from rollout_lab.hunt.workloads import GENERATORS, Limits, is_batch, make_trace


def space() -> Space:
    return Space.from_config(SpaceConfig(
        models=["a", "b"],
        engine={"dtype": ["float32", "bfloat16"], "max_num_seqs": [1, 4, 16], "block_size": [None, 32]},
        sampling={"n": [1, 2], "max_tokens": [1, 8]},
        generators=["many_short", "repeated"],
    ))


def test_coverage_counts_values_and_pairs_and_novelty_falls_as_they_are_tried():
    s = space()
    cov = Coverage(s.dims())
    # 2 models + 2 + 3 + 2 engine values + 2 generators + 2 + 2 sampling values = 15 values.
    assert cov.totals()[0] == 15
    point = {"model": "a", "engine.dtype": "float32", "engine.max_num_seqs": 1, "engine.block_size": None}
    assert cov.novelty(point) == 2 * 4 + 6  # 4 new values, 6 new pairs
    cov.record(point | {"seed": 7})
    assert cov.novelty(point) == 0
    assert cov.covered() == (4, 6)
    changed = point | {"engine.max_num_seqs": 16}
    assert cov.novelty(changed) == 2 + 3  # one new value, three new pairs with it
    assert 16 in cov.untried()["engine.max_num_seqs"] and 1 not in cov.untried()["engine.max_num_seqs"]


def test_the_same_seed_and_history_propose_the_same_groups_and_another_seed_does_not():
    def plan(seed):
        planner, cov = Planner(space(), seed, candidates=16), Coverage(space().dims())
        groups = []
        for i in range(5):
            g = planner.next_group(i, cov, 3)
            for w in g.workloads:
                cov.record(g.engine | w)
            groups.append((g.engine, g.workloads))
        return groups

    assert plan(0) == plan(0)
    assert plan(0) != plan(1)


def test_coverage_guidance_reaches_every_value_sooner_than_its_count_of_draws():
    s = space()
    planner, cov = Planner(s, 3, candidates=32), Coverage(s.dims())
    for i in range(3):
        g = planner.next_group(i, cov, 2)
        for w in g.workloads:
            cov.record(g.engine | w)
    # Three engines cover both models, both dtypes and all three max_num_seqs values.
    untried = cov.untried()
    assert untried["model"] == [] and untried["engine.dtype"] == [] and untried["engine.max_num_seqs"] == []


def test_exploitation_proposes_a_neighbour_of_a_failing_engine_and_retries_its_workload():
    s = space()
    planner, cov = Planner(s, 0, candidates=16, exploit=1.0), Coverage(s.dims())
    engine = {"model": "a", "engine.dtype": "float32", "engine.max_num_seqs": 4, "engine.block_size": 32}
    workload = {"generator": "repeated", "sampling.n": 2, "sampling.max_tokens": 8, "seed": 5}
    g = planner.next_group(0, cov, 3, failing=[(engine, workload)])
    assert g.reason == f"exploit:{point_key(engine, workload)}"
    assert sum(g.engine[k] != engine[k] for k in engine) == 1
    first = dict(g.workloads[0])
    assert first.pop("seed") != 5 and first == {k: v for k, v in workload.items() if k != "seed"}


def test_rejected_engines_are_not_proposed_again():
    s = space()
    planner, cov = Planner(s, 0, candidates=8), Coverage(s.dims())
    first = planner.next_group(0, cov, 1)
    again = Planner(s, 0, candidates=8).next_group(0, cov, 1, avoid={first.key})
    assert again.key != first.key


def test_space_rejects_unknown_generators_and_empty_knobs():
    with pytest.raises(ConfigError, match="not a generator"):
        Space.from_config(SpaceConfig(models=["a"], generators=["nope"]))
    with pytest.raises(ConfigError, match="hunt.space.engine.dtype has no values"):
        Space.from_config(SpaceConfig(models=["a"], engine={"dtype": []}, generators=["many_short"]))


def test_points_become_engine_and_sampling_arguments_with_nulls_left_out():
    point = {"model": "a", "engine.dtype": "float32", "engine.block_size": None, "generator": "x", "sampling.n": 2}
    assert engine_args(point) == {"dtype": "float32"}
    assert sampling_args(point) == {"n": 2}
    assert point_key(point) == point_key(dict(reversed(point.items())))


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_every_generator_is_seeded_and_fits_the_model_length(name):
    pool = list(range(1000, 1300))
    limits = Limits(max_model_len=128, max_num_batched_tokens=48, block_size=32)
    trace = make_trace(name, 11, pool, limits, max_tokens=16)
    assert trace == make_trace(name, 11, pool, limits, max_tokens=16)
    assert trace and all(1 <= len(r.prompt_token_ids) <= 128 - 16 for r in trace)
    assert all(t in pool for r in trace for t in r.prompt_token_ids)
    if name == "long_prompt":
        assert all(len(r.prompt_token_ids) > 48 for r in trace)
    if name == "repeated":
        assert len({tuple(r.prompt_token_ids) for r in trace}) == 1
    if name in ("many_short", "mixed_lengths", "shared_prefix", "long_prompt", "preemption_load"):
        assert is_batch(trace)


def test_timed_traces_add_requests_late_and_abort_some():
    limits = Limits(256, 256, 32)
    traces = [make_trace("timed_trace", seed, list(range(500)), limits, 8) for seed in range(20)]
    assert not all(is_batch(t) for t in traces)
    assert any(r.abort_after is not None for t in traces for r in t)
    assert any(r.arrive_step > 0 for t in traces for r in t)


def test_signatures_key_crashes_by_site_and_mismatches_by_oracle_model_dtype_and_class():
    engine = {"model": "smollm2", "engine.dtype": "float32"}
    crash = {"status": "crash", "crash": {"key": "IndexError@vllm/x.py:f"}}
    assert signature_of(engine, crash) == "IndexError@vllm/x.py:f"
    both = {"status": "fail", "oracles": {"reference": {"flagged": 3, "class": "preempted"},
                                          "metamorphic": {"flagged": 2, "class": "any"}}}
    assert signature_of(engine, both) == "mismatch/reference:smollm2:float32:preempted"
    alone = {"status": "fail", "oracles": {"reference": {"flagged": 0, "class": None},
                                           "metamorphic": {"flagged": 2, "class": "any"}}}
    assert signature_of(engine, alone) == "mismatch/metamorphic:smollm2:float32:any"
    assert signature_of(engine, {"status": "hang", "phase": "trial"}) == "hang@trial:smollm2"
    # Flagged prefix-cache hits are the same failure as flagged ordinary requests, as for the minimizer.
    cached = {"status": "fail", "oracles": {"reference": {"flagged": 1, "class": "prefix_cached"}, "metamorphic": {"flagged": 0}}}
    assert signature_of(engine, cached) == "mismatch/reference:smollm2:float32:any"


def test_store_keeps_trials_and_findings_across_reopening_and_refuses_a_corrupt_file(tmp_path):
    store = Store(tmp_path / "hunt.db")
    store.add_group(0, "g", {"model": "a"}, "explore", 1.0)
    store.add_trial("t1", 0, {"model": "a"}, {"generator": "x"}, "fail", "sig", {"oracles": {}}, 2.0, 10.0)
    store.put_finding(Finding("sig", "mismatch", "t1", 10.0, 1, 1, "a", "float32"))
    store.set_meta("elapsed_s", 12.5)
    again = Store(tmp_path / "hunt.db")
    assert again.trial_keys() == {"t1"} and again.next_group_index() == 1
    assert again.finding("sig").first_trial == "t1" and again.meta("elapsed_s") == 12.5
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="bad.db is not a readable hunt store"):
        Store(bad)


def test_read_lines_returns_complete_lines_only_and_resumes_from_the_offset(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"event": "start"}\n{"event": "res')
    events, offset = read_lines(path, 0)
    assert events == [{"event": "start"}]
    with path.open("a") as f:
        f.write('ult"}\n')
    events, offset = read_lines(path, offset)
    assert events == [{"event": "result"}] and offset == path.stat().st_size


def test_behaviours_are_what_the_engine_did_in_a_trial():
    quiet = {"status": "ok", "num_tokens": 10, "preempted_requests": 0, "cached_requests": 0, "num_aborted": 0, "batch": True}
    assert behaviours(quiet) == ["plain"]
    busy = quiet | {"preempted_requests": 2, "cached_requests": 1, "num_aborted": 1, "batch": False}
    assert behaviours(busy) == ["preempted", "prefix_cache_hit", "aborted", "stepped_trace"]
    assert behaviours({"status": "crash", "crash": {"key": "x"}}) == ["status:crash"]
    assert behaviours({"status": "rejected", "message": "no"}) == []


def test_the_planner_proposes_no_workload_that_fails_validation():
    s = space()
    greedy_pairs = lambda w: not (w["sampling.n"] == 2 and w["sampling.max_tokens"] == 1)
    planner, cov = Planner(s, 0, candidates=16, valid_workload=greedy_pairs), Coverage(s.dims())
    workloads = [w for i in range(6) for w in planner.next_group(i, cov, 4).workloads]
    assert workloads and all(greedy_pairs(w) for w in workloads)


def test_preemption_load_asks_for_more_tokens_than_the_cache_holds():
    limits = Limits(max_model_len=256, max_num_batched_tokens=256, block_size=32, num_blocks=10)
    for seed in range(5):
        trace = make_trace("preemption_load", seed, list(range(900)), limits, max_tokens=16)
        assert sum(len(r.prompt_token_ids) + 16 for r in trace) >= 1.5 * 10 * 32


def test_a_pressure_preset_is_an_engine_dimension_whose_knobs_replace_the_drawn_ones():
    s = Space.from_config(SpaceConfig(models=["a"], pressure=[None, "kv_tight"], engine={"max_num_seqs": [1, 4]},
                                      generators=["many_short"]))
    assert s.engine_dims()["pressure"] == [None, "kv_tight"]
    drawn = {"model": "a", "pressure": "kv_tight", "engine.max_num_seqs": 1}
    tight = with_pressure(drawn)
    assert tight["engine.max_num_seqs"] == 32 and tight["engine.kv_cache_memory_bytes"] == 24000000
    assert with_pressure(drawn | {"pressure": None}) == drawn | {"pressure": None}
    with pytest.raises(ConfigError, match="'nope' is not a preset"):
        Space.from_config(SpaceConfig(models=["a"], pressure=["nope"], generators=["many_short"]))


def test_a_pressure_preset_gives_the_hunt_its_values_for_the_drawn_model():
    attention = with_pressure({"model": "smollm2", "pressure": "kv_tight"})
    hybrid = with_pressure({"model": "hybrid-tiny", "pressure": "kv_tight"})
    assert attention["engine.max_model_len"] == 256 and hybrid["engine.max_model_len"] == 512
    assert hybrid["engine.enable_prefix_caching"] is False and "engine.enable_prefix_caching" not in attention


def test_a_crash_raised_by_the_harness_outside_vllm_is_not_a_finding(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rollout_lab.hunt.__main__ import Hunt
    from rollout_lab.hunt.space import HuntRunConfig, register

    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("hunt_run", overrides=["hunt=smoke"]))
    assert isinstance(cfg, HuntRunConfig)
    hunt = Hunt(cfg, tmp_path)
    group = {"idx": 0, "engine": {"model": "smollm2"}}
    hunt.store.add_group(0, "g", group["engine"], "explore", 0.0)
    ours = {"exception_type": "AttributeError", "message": "no attribute", "vllm_frames": [], "key": "AttributeError@no-vllm-frame",
            "traceback": 'File "/x/rollout_lab/hunt/runner.py", line 198, in collect'}
    hunt.record_trial(group, "t1", {"generator": "many_short"}, {"status": "crash", "crash": ours})
    assert hunt.store.findings() == []
    engines = ours | {"vllm_frames": ["vllm/v1/a.py:f"], "key": "AttributeError@vllm/v1/a.py:f"}
    hunt.record_trial(group, "t2", {"generator": "many_short"}, {"status": "crash", "crash": engines})
    assert [f.signature for f in hunt.store.findings()] == ["AttributeError@vllm/v1/a.py:f"]


def test_a_crash_with_the_signature_of_a_repro_in_the_repo_is_known_and_not_minimized_again(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rollout_lab.hunt.__main__ import Hunt, known_bugs
    from rollout_lab.hunt.space import register

    repro = tmp_path / "repros" / "bug" / "repro.py"
    repro.parent.mkdir(parents=True)
    repro.write_text("EXPECTED = Expected(kind='crash', spike_threshold=0.001, crash_key='E@vllm/a.py:f', request_class=None)\n")
    assert known_bugs(tmp_path / "repros") == {"E@vllm/a.py:f": str(repro)}
    assert known_bugs(tmp_path / "missing") == {}
    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("hunt_run", overrides=["hunt=smoke", f"hunt.known_repros={tmp_path / 'repros'}"]))
    hunt = Hunt(cfg, tmp_path / "hunt")
    group = {"idx": 0, "engine": {"model": "smollm2"}}
    hunt.store.add_group(0, "g", group["engine"], "explore", 0.0)
    crash = {"exception_type": "E", "message": "m", "vllm_frames": ["vllm/a.py:f"], "key": "E@vllm/a.py:f", "traceback": ""}
    hunt.record_trial(group, "t1", {"generator": "many_short"}, {"status": "crash", "crash": crash})
    [finding] = hunt.store.findings()
    assert finding.state == "known" and finding.repro == str(repro)


def test_a_minimization_leaves_the_verification_its_time_but_never_drops_below_the_floor():
    from rollout_lab.hunt.__main__ import seconds_for_minimization

    assert seconds_for_minimization(left=800, verification=4 * 45, floor=300) == 620
    assert seconds_for_minimization(left=400, verification=4 * 45, floor=300) == 300
    assert seconds_for_minimization(left=-10, verification=0, floor=300) == 300


def test_a_mismatch_whose_engine_holds_a_minimized_findings_trigger_is_its_duplicate():
    from rollout_lab.hunt.__main__ import duplicate_of

    def finding(signature, engine, minimized=None, kind="mismatch"):
        detail = {"engine": engine} | ({"minimized": minimized} if minimized else {})
        return Finding(signature, kind, "t", 0.0, 1, 1, "smollm2", "float32", state="verified", detail=detail)

    engine = {"model": "smollm2", "engine.dtype": "float32", "engine.block_size": 32, "engine.max_num_seqs": 4}
    first = finding("mismatch/reference:smollm2:float32:any", engine,
                    {"knobs": ["block_size"], "engine_args": {"block_size": 32, "dtype": "float32"}})
    bf16 = finding("mismatch/reference:smollm2:bfloat16:any", engine | {"engine.dtype": "bfloat16", "engine.max_num_seqs": 64})
    assert duplicate_of(bf16, [first]) is first
    # The trigger's value differs, or the oracle, the class or the model does: a finding of its own.
    assert duplicate_of(finding(bf16.signature, bf16.detail["engine"] | {"engine.block_size": 128}), [first]) is None
    assert duplicate_of(finding("mismatch/metamorphic:smollm2:bfloat16:any", bf16.detail["engine"]), [first]) is None
    assert duplicate_of(finding("mismatch/reference:smollm2:bfloat16:preempted", bf16.detail["engine"]), [first]) is None
    assert duplicate_of(finding("mismatch/reference:hybrid-tiny:float32:any", engine | {"model": "hybrid-tiny"}), [first]) is None
    # Crashes keep their signatures; an unminimized finding explains nothing.
    assert duplicate_of(finding("RuntimeError@vllm/a.py:f", engine, kind="crash"), [first]) is None
    assert duplicate_of(bf16, [finding(first.signature, engine)]) is None


def test_after_a_crash_in_a_trial_the_groups_untried_workloads_go_on_a_fresh_engine():
    from types import SimpleNamespace

    from rollout_lab.hunt.__main__ import Hunt
    from rollout_lab.hunt.search import Group

    group = Group(7, {"model": "a", "engine.dtype": "float32"}, [{"seed": i} for i in range(4)], "explore")
    keys = [group.trial_key(w) for w in group.workloads]
    hunt = SimpleNamespace(done={keys[0], keys[1]})  # the second trial crashed the engine
    rest = Hunt.rest_after_crash(hunt, group, "crash")
    assert rest.engine == group.engine and rest.workloads == group.workloads[2:]
    assert Hunt.rest_after_crash(hunt, group, "ok") is None
    assert Hunt.rest_after_crash(SimpleNamespace(done=set(keys)), group, "crash") is None
    # The crash came on the first trial: the configuration crashes on anything, no fresh engine.
    assert Hunt.rest_after_crash(SimpleNamespace(done={keys[0]}), group, "crash") is None
    # The engine crashed at start: a fresh one would too.
    assert Hunt.rest_after_crash(SimpleNamespace(done={f"{group.key}-start"}), group, "crash") is None


def test_the_metamorphic_oracle_rescores_reference_flagged_sequences_first_then_preempted_then_cached():
    from rollout_lab.hunt.runner import Scored, suspicious_first

    def item(i, diff=0.0, preempted=0, cached=0):
        return Scored(i, 0, [1], [2], [-1.0], preempted, cached, None, reference=[-1.0 - diff])

    items = [item(0), item(1, cached=16), item(2, preempted=1), item(3, diff=0.5), item(4, diff=8.0), item(5, diff=1e-4)]
    assert [s.request for s in suspicious_first(items, tolerance=1e-3)] == [4, 3, 2, 1, 0, 5]


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_stop_the_hunt_like_ctrl_c_even_when_sigint_was_ignored(signum):
    import subprocess
    import sys

    script = (
        "import os, signal\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell leaves a background job\n"
        "from rollout_lab.hunt.__main__ import stop_on_signals\n"
        "stop_on_signals()\n"
        "try:\n"
        f"    os.kill(os.getpid(), signal.{signum})\n"
        "    import time; time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "stopped", done.stderr[-2000:]
