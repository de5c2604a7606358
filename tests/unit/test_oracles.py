"""The oracle interface and registry: the built-ins found by name, a Signature, a case file's kind;
a toy oracle registered through the public interface judged, recorded, printed and reported by the
hunt, and handed to the minimizer as its own failure (its minimization: tests/integration/test_oracle_plugin.py)."""
from pathlib import Path

import pytest

from rollout_lab import oracles
from rollout_lab.hunt.protocol import Signature, TrialFinished, TrialResult
from rollout_lab.hunt.runner import Scored
from rollout_lab.oracles.records import OracleVerdict, WorstToken
from rollout_lab.minimize.handoff import CaseFile, HandoffError
from rollout_lab.minimize.standalone import Case, Expected, Request

CONF = Path(__file__).resolve().parents[2] / "conf"


def items() -> list[Scored]:
    """Two completions: the second preempted, one token off the reference by 0.5, re-scored alone off by 2e-3."""
    return [Scored(0, 0, [1, 2], [5, 6], [-0.5, -1.5], 0, 0, 3, reference=[-0.5, -1.5], rescored=[-0.5, -1.5]),
            Scored(1, 0, [1, 3], [7, 8], [-2.0, -0.25], 1, 0, 4, reference=[-2.5, -0.25], rescored=[-2.002, -0.25])]


def test_the_builtins_are_found_by_name_and_judge_a_trial_as_the_runner_did():
    assert [o.name for o in oracles.trial_oracles()] == ["reference", "metamorphic", "batch_invariance"]
    assert Expected("mismatch", 1e-3, request_class="any").oracle is oracles.get("reference")
    assert oracles.oracle_of(Signature.parse("hang@trial:smollm2")).name == "hang"
    assert oracles.oracle_of(Signature.parse("mismatch/metamorphic:smollm2:float32:any")).why_not_minimized()
    with pytest.raises(KeyError, match="no oracle 'nope'; registered: .*reference"):
        oracles.get("nope")
    verdicts = oracles.measure_trial(oracles.Trial(None, items(), {"reference": 1e-3, "metamorphic": 1e-3}))
    assert verdicts["reference"] == OracleVerdict(4, 1, 0.5, "preempted", WorstToken(0.5, 1, 0, 7))
    assert verdicts["metamorphic"].flagged == 1 and verdicts["metamorphic"].max_diff == pytest.approx(2e-3)
    assert verdicts["batch_invariance"].requests == 0  # fewer than two requests sampled: nothing run alone


def test_the_batch_oracle_runs_nothing_alone_where_nothing_is_promised_and_the_floor_is_measured(monkeypatch):
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    sampled = [([1], None, None), ([2], None, None)]
    # No engine: a verdict that ran nothing alone must not touch it.
    verdict = oracles.get("batch_invariance").measure(oracles.Trial(None, [], {}, sampled, measure_floor=False))
    assert (verdict.requests, verdict.flagged, verdict.promised) == (0, 0, False)


def hunt_cfg():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rollout_lab.hunt.space import register

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_object(compose("hunt_run", overrides=["hunt=smoke", "logger.mode=offline"]))


def test_a_registered_toy_oracle_is_judged_recorded_and_reported_by_the_hunt(toy_oracle, tmp_path, monkeypatch, capsys):
    from rollout_lab.hunt import report
    from rollout_lab.hunt.driver import Hunt
    from rollout_lab.hunt.repros import case_file

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    tolerances = {o.name: o.tolerance(None, "float32") if o is toy_oracle else 1e-3 for o in oracles.trial_oracles()}
    verdicts = oracles.measure_trial(oracles.Trial(None, items(), tolerances))
    assert (verdicts["unlikely_token"].flagged, verdicts["unlikely_token"].tokens) == (2, 4)  # -1.5 and -2.0
    case = Case("smollm2", {"disable_log_stats": False}, [Request([1, 2], 3), Request([1, 3], 4)], max_tokens=2)
    # Only the toy flagged the trial: the reference's 0.5 passes a bfloat16-sized bound.
    verdicts = {"unlikely_token": verdicts["unlikely_token"]}
    result = TrialResult("fail", dtype="float32", oracles=verdicts, num_requests=2, num_tokens=4, case=case)

    cfg = hunt_cfg()
    hunt = Hunt(cfg, tmp_path / "hunt")
    hunt.record_trial(0, {"model": "smollm2", "engine.dtype": "float32"}, "g0-w0", {"generator": "chat", "seed": 1}, result)
    hunt.supervisor.report_trial(TrialFinished("g0", "g0-w0", {}, result))
    (finding,) = hunt.store.findings()
    assert str(finding.signature) == "mismatch/unlikely_token:smollm2:float32:any"
    assert "fail 2 requests, 4 tokens, 0 preempted, 0 cached; unlikely_token 2/4 flagged, max 2" in capsys.readouterr().out
    text = report.write(hunt.dir, hunt.store, hunt.coverage, [], cfg).read_text()
    assert "| mismatch/unlikely_token:smollm2:float32:any | mismatch/unlikely_token | g0-w0 |" in text

    handed = case_file(finding, dict(cfg.hunt.oracles.reference_tolerance), None, {})
    assert handed.expected == Expected("unlikely_token", -1.0)
    assert CaseFile.read(handed.write(tmp_path / "case.json")).expected.describe() == "a sampled token whose vLLM logprob is below -1"


def test_a_case_file_naming_no_registered_oracle_is_refused_in_one_line(tmp_path):
    case = Case("smollm2", {}, [Request([1], 0)], max_tokens=1)
    path = CaseFile("smollm2", case, Expected("unlikely_token", -1.0)).write(tmp_path / "case.json")
    with pytest.raises(HandoffError, match=r"case.json: no oracle 'unlikely_token'; registered: batch_invariance, crash"):
        CaseFile.read(path)
