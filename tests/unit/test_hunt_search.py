"""The hunt's search: coverage bookkeeping, seeded reproducibility, exploitation, dedup keys, triage."""
import pytest

from rollout_lab.config import ConfigError
from rollout_lab.crash import CrashSignature
from rollout_lab.hunt.protocol import Finding, OracleVerdict, Signature, TrialResult
from rollout_lab.hunt.search import Coverage, Planner
from rollout_lab.hunt.space import Space, SpaceConfig, engine_args, point_key, sampling_args, with_pressure
from rollout_lab.hunt.triage import behaviours
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
    crash = TrialResult("crash", crash=CrashSignature("IndexError", "m", ["vllm/x.py:f"]))
    assert str(crash.signature(engine)) == "IndexError@vllm/x.py:f"
    both = TrialResult("fail", oracles={"reference": OracleVerdict(flagged=3, request_class="preempted"),
                                        "metamorphic": OracleVerdict(flagged=2, request_class="any")})
    assert str(both.signature(engine)) == "mismatch/reference:smollm2:float32:preempted"
    alone = TrialResult("fail", oracles={"reference": OracleVerdict(), "metamorphic": OracleVerdict(flagged=2, request_class="any")})
    assert str(alone.signature(engine)) == "mismatch/metamorphic:smollm2:float32:any"
    assert str(TrialResult("hang", phase="trial").signature(engine)) == "hang@trial:smollm2"
    assert str(TrialResult("died", phase="engine_start").signature(engine)) == "died@engine_start:smollm2"
    assert TrialResult("ok").signature(engine) is None and TrialResult("harness_error").signature(engine) is None
    # Flagged prefix-cache hits are the same failure as flagged ordinary requests, as for the minimizer.
    cached = TrialResult("fail", oracles={"reference": OracleVerdict(flagged=1, request_class="prefix_cached")})
    assert str(cached.signature(engine)) == "mismatch/reference:smollm2:float32:any"


def test_a_failing_trial_is_keyed_by_the_first_oracle_in_order_that_flagged():
    late = TrialResult("fail", oracles={"batch_invariance": OracleVerdict(flagged=1), "reference": OracleVerdict(),
                                        "metamorphic": OracleVerdict(flagged=1)})
    assert late.first_flagged() == "metamorphic" and late.failed_oracles == ["metamorphic", "batch_invariance"]


def test_behaviours_are_what_the_engine_did_in_a_trial():
    quiet = TrialResult("ok", num_tokens=10)
    assert behaviours(quiet) == ["plain"]
    busy = TrialResult("fail", num_tokens=10, preempted_requests=2, cached_requests=1, num_aborted=1, batch=False)
    assert behaviours(busy) == ["preempted", "prefix_cache_hit", "aborted", "stepped_trace"]
    assert behaviours(TrialResult("crash")) == ["status:crash"]
    assert behaviours(TrialResult("rejected", message="no")) == []


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


def test_a_minimization_leaves_the_verification_its_time_but_never_drops_below_the_floor():
    from rollout_lab.hunt.repros import seconds_for_minimization

    assert seconds_for_minimization(left=800, verification=4 * 45, floor=300) == 620
    assert seconds_for_minimization(left=400, verification=4 * 45, floor=300) == 300
    assert seconds_for_minimization(left=-10, verification=0, floor=300) == 300


def test_a_mismatch_whose_engine_holds_a_minimized_findings_trigger_is_its_duplicate():
    from rollout_lab.hunt.triage import duplicate_of
    from rollout_lab.minimize.handoff import MinimizedResult

    def finding(signature, engine, minimized=None):
        return Finding(Signature.parse(signature), "t", 0.0, 1, 1, engine, {}, TrialResult("fail"), state="verified",
                       minimized=minimized)

    engine = {"model": "smollm2", "engine.dtype": "float32", "engine.block_size": 32, "engine.max_num_seqs": 4}
    first = finding("mismatch/reference:smollm2:float32:any", engine,
                    MinimizedResult({"block_size": 32, "dtype": "float32"}, ["block_size"], "", "", 1, 1.0))
    bf16 = finding("mismatch/reference:smollm2:bfloat16:any", engine | {"engine.dtype": "bfloat16", "engine.max_num_seqs": 64})
    assert duplicate_of(bf16, [first]) is first
    # The trigger's value differs, or the oracle, the class or the model does: a finding of its own.
    assert duplicate_of(finding(str(bf16.signature), bf16.engine | {"engine.block_size": 128}), [first]) is None
    assert duplicate_of(finding("mismatch/metamorphic:smollm2:bfloat16:any", bf16.engine), [first]) is None
    assert duplicate_of(finding("mismatch/reference:smollm2:bfloat16:preempted", bf16.engine), [first]) is None
    assert duplicate_of(finding("mismatch/reference:hybrid-tiny:float32:any", engine | {"model": "hybrid-tiny"}), [first]) is None
    # Crashes keep their signatures; an unminimized finding explains nothing.
    assert duplicate_of(finding("RuntimeError@vllm/a.py:f", engine), [first]) is None
    assert duplicate_of(bf16, [finding(str(first.signature), engine)]) is None
    # A minimal case that kept the pool head explains only findings from the same head.
    high = finding("mismatch/reference:smollm2:float32:any", engine | {"block_pool_head": 0.8},
                   MinimizedResult({"block_size": 32}, ["block_size", "block_pool_head"], "", "", 1, 1.0, block_pool_head=0.8))
    assert duplicate_of(finding(str(high.signature), engine | {"block_pool_head": 0.8}), [high]) is high
    assert duplicate_of(finding(str(high.signature), engine), [high]) is None


def test_after_a_crash_in_a_trial_the_groups_untried_workloads_go_on_a_fresh_engine():
    from rollout_lab.hunt.driver import rest_after_crash
    from rollout_lab.hunt.search import Group

    group = Group(7, {"model": "a", "engine.dtype": "float32"}, [{"seed": i} for i in range(4)], "explore")
    keys = [group.trial_key(w) for w in group.workloads]
    done = {keys[0], keys[1]}  # the second trial crashed the engine
    rest = rest_after_crash(group, "crash", done)
    assert rest.engine == group.engine and rest.workloads == group.workloads[2:]
    assert rest_after_crash(group, "ok", done) is None
    assert rest_after_crash(group, "crash", set(keys)) is None
    # The crash came on the first trial: the configuration crashes on anything, no fresh engine.
    assert rest_after_crash(group, "crash", {keys[0]}) is None
    # The engine crashed at start: a fresh one would too.
    assert rest_after_crash(group, "crash", {f"{group.key}-start"}) is None


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
        "from rollout_lab.hunt.driver import stop_on_signals\n"
        "stop_on_signals()\n"
        "try:\n"
        f"    os.kill(os.getpid(), signal.{signum})\n"
        "    import time; time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "stopped", done.stderr[-2000:]
