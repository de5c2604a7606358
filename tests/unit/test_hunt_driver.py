"""The hunt's driver on hand-made trial results (no engine): harness errors and known bugs in
triage, a hunt dir resumed on another machine, the budget handed to a group as its deadline."""
import shutil
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

from rollout_lab.crash import CrashSignature
from rollout_lab.hunt.driver import Hunt
from rollout_lab.hunt.protocol import OracleVerdict, Signature, TrialResult, read_known_bugs, write_known_bug
from rollout_lab.minimize.handoff import MinimizedResult
from rollout_lab.minimize.standalone import Case, Request

ENGINE = {"model": "smollm2", "engine.dtype": "float32"}
WORKLOAD = {"generator": "many_short", "seed": 7}
CRASH_KEY = "RuntimeError@vllm/v1/a.py:f"


def failing_result() -> TrialResult:
    case = Case("smollm2", {"disable_log_stats": False}, [Request([1, 2, 3], 11)], max_tokens=8)
    return TrialResult("fail", dtype="float32", oracles={"reference": OracleVerdict(8, 2, 2.5, "preempted")}, num_tokens=8, case=case)


def crash_result() -> TrialResult:
    return TrialResult("crash", dtype="float32", crash=CrashSignature("RuntimeError", "boom", ["vllm/v1/a.py:f"]),
                       case=failing_result().case)


def hunt_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rollout_lab.hunt.space import HuntRunConfig, register

    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("hunt_run", overrides=["hunt=smoke", *overrides]))
    assert isinstance(cfg, HuntRunConfig)
    return cfg


def test_a_crash_raised_by_the_harness_outside_vllm_is_not_a_finding(tmp_path):
    hunt = Hunt(hunt_cfg(), tmp_path)
    hunt.store.add_group(0, "g", {"model": "smollm2"}, "explore", 0.0)
    ours = CrashSignature("AttributeError", "no attribute", [], traceback='File "/x/rollout_lab/hunt/runner.py", line 198, in collect')
    hunt.record_trial(0, {"model": "smollm2"}, "t1", {"generator": "many_short"}, TrialResult("crash", crash=ours))
    assert hunt.store.findings() == [] and hunt.store.trials()[0].status == "harness_error"
    engines = CrashSignature("AttributeError", "no attribute", ["vllm/v1/a.py:f"], traceback=ours.traceback)
    hunt.record_trial(0, {"model": "smollm2"}, "t2", {"generator": "many_short"}, TrialResult("crash", crash=engines))
    assert [str(f.signature) for f in hunt.store.findings()] == ["AttributeError@vllm/v1/a.py:f"]


def test_a_crash_with_the_signature_of_a_repro_in_the_repo_is_known_and_not_minimized_again(tmp_path):
    folder = tmp_path / "repros" / "bug"
    folder.mkdir(parents=True)
    (folder / "repro.py").write_text("print('a repro')\n")
    write_known_bug(folder, Signature.parse("E@vllm/a.py:f"))
    hunt = Hunt(hunt_cfg(f"hunt.known_repros={tmp_path / 'repros'}"), tmp_path / "hunt")
    hunt.store.add_group(0, "g", {"model": "smollm2"}, "explore", 0.0)
    crash = TrialResult("crash", crash=CrashSignature("E", "m", ["vllm/a.py:f"]))
    hunt.record_trial(0, {"model": "smollm2"}, "t1", {"generator": "many_short"}, crash)
    [finding] = hunt.store.findings()
    assert finding.state == "known" and finding.repro == str(folder / "repro.py")


def test_the_repos_own_known_bugs_are_its_crash_repros_named_relative_to_the_repo(tmp_path):
    known = Hunt(hunt_cfg(), tmp_path).known
    assert sorted(known.values()) == ["repro/gpu_granite_hybrid_layer_names/repro.py", "repro/gpu_mamba2_prefix_caching/repro.py",
                                      "repro/gpu_mamba2_v2_runner_start/repro.py", "repro/hunt_mamba_prefix_caching/repro.py",
                                      "repro/hunt_seeded_chunked_prefill/repro.py"]
    assert all(sig.kind == "crash" for sig in known)


def test_a_hunt_dir_copied_to_another_machine_resumes_and_its_store_holds_no_absolute_path(tmp_path, monkeypatch):
    """The GPU hunt runs in several device calls, each on a bare machine with the hunt dir carried in."""
    from rollout_lab.hunt import repros
    from rollout_lab.minimize import emit

    first_dir = tmp_path / "machine_a" / "hunt"
    cfg = hunt_cfg("fault=stale_state", "hunt.verify_runs=2")
    hunt = Hunt(cfg, first_dir)
    hunt.store.add_group(0, "g", ENGINE, "explore", 0.0)
    hunt.record_trial(0, ENGINE, "t1", WORKLOAD, failing_result())
    hunt.record_trial(0, ENGINE, "t2", WORKLOAD, crash_result())

    def minimizer(command, cwd, stdout, stderr):
        """What `python -m rollout_lab.minimize` leaves behind: repro.py and minimized.json."""
        out = Path(command[command.index("--out") + 1]) / command[command.index("--name") + 1]
        out.mkdir(parents=True, exist_ok=True)
        (out / "repro.py").write_text("print('REPRODUCED')\n")
        MinimizedResult({"block_size": 32}, ["block_size"], "a", "b", 3, 1.0).write(out)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(repros.subprocess, "run", minimizer)
    monkeypatch.setattr(emit, "run_isolated", lambda script, args=(): SimpleNamespace(status=1, seconds=0.5))
    hunt.repros.minimize_new(lambda: 1000.0)
    crash = hunt.store.finding(Signature.parse(CRASH_KEY))
    assert crash.state == "verified" and crash.repro_rate == "2/2" and crash.trigger == ["block_size"]
    assert crash.repro.startswith("repro/") and (first_dir / crash.repro).is_file()
    # A real bug (it failed with the planted fault off) marks its folder as known.
    assert read_known_bugs(first_dir / "repro") == {crash.signature: first_dir / crash.repro}

    second_dir = tmp_path / "machine_b" / "elsewhere"
    shutil.copytree(first_dir, second_dir)
    shutil.rmtree(tmp_path / "machine_a")
    dump = "\n".join(sqlite3.connect(second_dir / "hunt.db").iterdump())
    assert str(tmp_path) not in dump  # no path of the first machine's
    resumed = Hunt(cfg, second_dir)
    assert resumed.resumed and resumed.done == {"t1", "t2"}
    assert [f.state for f in resumed.store.findings()] == ["verified", "verified"]
    assert all((second_dir / f.repro).is_file() for f in resumed.store.findings())


def test_the_driver_gives_a_group_the_budget_left_as_its_deadline(tmp_path, monkeypatch):
    hunt = Hunt(hunt_cfg("hunt.budget_s=100"), tmp_path)
    hunt.elapsed_before = 60.0
    seen = {}
    monkeypatch.setattr(hunt.supervisor, "run", lambda group, done, deadline, record: seen.setdefault("deadline", deadline) and "ok")
    hunt.run_group(SimpleNamespace(key="g"))
    assert abs(seen["deadline"] - (time.time() + 40.0)) < 2.0


def test_a_group_the_budget_stopped_runs_its_untried_workloads_first_when_the_hunt_resumes(tmp_path):
    from rollout_lab.hunt.search import Group

    hunt = Hunt(hunt_cfg(), tmp_path)
    group = Group(0, ENGINE, [WORKLOAD | {"seed": i} for i in range(3)])
    hunt.store.add_group(0, group.key, ENGINE, "explore", 0.0, group.workloads)
    hunt.record_trial(0, ENGINE, group.trial_key(group.workloads[0]), group.workloads[0], TrialResult("ok"))
    hunt.store.end_group(0, "out_of_time", "the hunt's budget ran out before trial x")
    resumed = Hunt(hunt_cfg(), tmp_path)
    assert resumed.pending.engine == ENGINE and resumed.pending.workloads == group.workloads[1:]
    # A group that ended otherwise is not continued: the planner proposes the next one.
    hunt.store.end_group(0, "ok")
    assert Hunt(hunt_cfg(), tmp_path).pending is None
