"""The one tolerance lookup: the engine dtype's row, or fp8_kv's for an fp8 KV cache, for every caller
(the RL job's spike threshold and weight-sync bound, the hunt's oracles and the case it hands the minimizer)."""
import json

import pytest
from omegaconf import OmegaConf

from rollout_lab import tolerances
from rollout_lab.config import RunConfig
from rollout_lab.hunt.space import OracleConfig
from rollout_lab.tolerances import TOLERANCES, calibration_key, clean_agreement, engine_row, oracle_row, threshold_for, tolerance


@pytest.mark.parametrize("dtype, kv_cache_dtype, row", [("bfloat16", "fp8", "fp8_kv"), ("float32", "fp8_e4m3", "fp8_kv"),
                                                         ("bfloat16", "auto", "bfloat16"), ("float32", None, "float32")])
def test_an_fp8_kv_cache_reads_its_own_row(dtype, kv_cache_dtype, row):
    assert oracle_row(dtype, kv_cache_dtype) == row
    assert tolerance(dtype, kv_cache_dtype) is TOLERANCES[row]


def test_the_fp8_row_is_looser_than_bfloat16_and_above_its_measured_clean_maximum():
    fp8, bf16 = TOLERANCES["fp8_kv"], TOLERANCES["bfloat16"]
    assert fp8.spike_threshold > max(fp8.clean_max.values()) and fp8.clean_max["gpu"] > bf16.spike_threshold
    assert OracleConfig().reference_tolerance["fp8_kv"] == fp8.spike_threshold
    assert "1.6 on GPU" in clean_agreement("fp8_kv")
    assert clean_agreement("bfloat16", "fp8_e5m2") == "clean fp8_kv runs agree to ~1.7 on CPU, ~1.6 on GPU"
    # The weight-sync probe of a clean CPU run with fp8 KV reached 1.8: its bound sits above it.
    assert fp8.weight_sync > 1.8


def run_config(*overrides: str) -> RunConfig:
    """A RunConfig as Hydra builds one from command-line overrides (+engine.args.kv_cache_dtype=fp8 included)."""
    base = OmegaConf.structured(RunConfig)
    return OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])))


@pytest.fixture
def no_calibration(tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    monkeypatch.setattr(tolerances, "calibration_path", lambda: path)
    return path


@pytest.mark.parametrize("overrides, threshold, row", [
    ((), 1e-3, "float32"),
    (("engine.dtype=bfloat16",), 1.5, "bfloat16"),
    # An fp8 KV cache: quantization noise (up to 1.65 clean on the H200) is no mismatch, whatever the dtype.
    (("+engine.args.kv_cache_dtype=fp8",), 5.0, "fp8_kv"),
    (("engine.dtype=bfloat16", "+engine.args.kv_cache_dtype=fp8_e4m3"), 5.0, "fp8_kv"),
    (("+engine.args.kv_cache_dtype=auto",), 1e-3, "float32"),
])
def test_the_rl_jobs_threshold_and_sync_bound_follow_the_kv_cache_dtype(no_calibration, overrides, threshold, row):
    cfg = run_config(*overrides)
    assert engine_row(cfg) == row
    assert threshold_for(cfg) == (threshold, f"built-in default for {row} (no calibration for {calibration_key(row)})")
    assert tolerance(engine_row(cfg)).weight_sync == TOLERANCES[row].weight_sync


def test_an_fp8_run_reads_no_calibration_made_without_fp8(no_calibration):
    no_calibration.write_text(json.dumps({calibration_key("bfloat16"): {"threshold": 0.3},
                                          calibration_key("fp8_kv"): {"threshold": 4.0}}))
    assert threshold_for(run_config("engine.dtype=bfloat16"))[0] == 0.3
    assert threshold_for(run_config("engine.dtype=bfloat16", "+engine.args.kv_cache_dtype=fp8"))[0] == 4.0
    assert threshold_for(run_config("+engine.args.kv_cache_dtype=fp8", "loop.spike_threshold=2.0"))[0] == 2.0


def test_the_hunts_case_for_the_minimizer_keeps_the_fp8_row_its_oracle_judged_by():
    from rollout_lab.hunt.protocol import Finding, OracleVerdict, Signature, TrialResult
    from rollout_lab.hunt.repros import case_file

    result = TrialResult("fail", dtype="bfloat16", oracles={"reference": OracleVerdict(40, 3, 7.5, "any")})
    engine = {"model": "smollm2", "engine.dtype": "bfloat16", "engine.kv_cache_dtype": "fp8"}
    finding = Finding(Signature.parse("mismatch/reference:smollm2:bfloat16:any"), "t1", 5.0, 1, 1, engine, {}, result)
    assert case_file(finding, OracleConfig().reference_tolerance, None, {}).expected.spike_threshold == 5.0
    finding.engine = engine | {"engine.kv_cache_dtype": None}
    assert case_file(finding, OracleConfig().reference_tolerance, None, {}).expected.spike_threshold == 1.5


@pytest.mark.parametrize("overrides, bound", [
    ((), TOLERANCES["float32"].weight_sync),
    (("trainer.dtype=bfloat16",), TOLERANCES["bfloat16"].weight_sync),
    (("engine.dtype=bfloat16",), TOLERANCES["bfloat16"].weight_sync),
    (("trainer.dtype=bfloat16", "+engine.args.kv_cache_dtype=fp8"), TOLERANCES["fp8_kv"].weight_sync),
    (("trainer.dtype=bfloat16", "loop.weight_sync_tolerance=0.01"), 0.01),
])
def test_the_weight_sync_bound_follows_the_lower_precision_of_the_two_sides(overrides, bound):
    """Defect: a float32 engine with a bfloat16 trainer checked the sync by float32's 1e-3 while the
    trainer computes the probe in bfloat16: a correct sync ended sync_mismatch."""
    assert tolerances.weight_sync_tolerance(run_config(*overrides)) == bound
