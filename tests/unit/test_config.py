from pathlib import Path

import pytest

from rollout_lab.config import ConfigError, RunConfig, validate


def test_default_config_is_valid():
    validate(RunConfig())


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("engine", "dtype", "float8", "engine.dtype='float8' is not valid"),
        ("engine", "max_model_len", 0, "engine.max_model_len=0 must be a positive number"),
        ("engine", "kv_cache_memory_bytes", -5, "engine.kv_cache_memory_bytes=-5"),
        ("engine", "gpu_memory_utilization", 1.5, "gpu_memory_utilization=1.5"),
        ("workload", "max_tokens", 600, "leaves no room for the prompt"),
        ("engine", "seed_policy", "random", "engine.seed_policy='random'"),
    ],
)
def test_invalid_values_name_the_key(section, key, value, message):
    cfg = RunConfig()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)


def test_spike_threshold_follows_the_loosest_dtype_then_calibration(tmp_path, monkeypatch):
    import json

    from rollout_lab import tolerances

    monkeypatch.setenv("ROLLOUT_LAB_CACHE", str(tmp_path))
    cfg = RunConfig()
    assert tolerances.threshold_for(cfg)[0] == 1e-3
    cfg.trainer.dtype = "bfloat16"
    assert tolerances.threshold_for(cfg)[0] == 1.5
    (tmp_path / "calibration.json").write_text(json.dumps({tolerances.calibration_key("bfloat16"): {"threshold": 0.42}}))
    value, source = tolerances.threshold_for(cfg)
    assert value == 0.42 and "calibration" in source
    cfg.loop.spike_threshold = 0.05
    assert tolerances.threshold_for(cfg) == (0.05, "config loop.spike_threshold")


def test_every_check_reads_the_one_tolerance_table(compose):
    from omegaconf import OmegaConf

    from rollout_lab.hunt.space import OracleConfig
    from rollout_lab.tolerances import clean_agreement, tolerance

    assert [tolerance(d).weight_sync for d in ("float32", "bfloat16", "float16")] == [1e-3, 0.5, 0.2]
    assert [tolerance(d).calibration_floor for d in ("float32", "bfloat16", "float16")] == [1e-3, 0.05, 0.01]
    # The hunt's oracles flag the comparison the loop's spike threshold flags, at the same bound.
    oracles = OracleConfig()
    assert oracles.reference_tolerance == {"float32": 1e-3, "bfloat16": 1.5, "float16": 1.0, "fp8_kv": 5.0}
    assert oracles.metamorphic_tolerance == {"float32": 1e-3, "bfloat16": 1.5, "float16": 1.0, "fp8_kv": 5.0}
    assert clean_agreement("float32") == "clean float32 runs agree to ~6.6e-5 on CPU, ~6e-5 on GPU"
    assert clean_agreement("float16") == clean_agreement("auto") == clean_agreement("float32")
    assert clean_agreement("bfloat16") == "clean bfloat16 runs agree to ~0.26 on CPU, ~0.46 on GPU"
    with pytest.raises(ValueError, match="no tolerances for dtype 'float8'"):
        tolerance("float8")


def test_loop_does_not_import_calibrate():
    """calibrate.py runs the loop; the loop reads thresholds from tolerances.py, never from calibrate."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "rollout_lab"

    def imported(module: str) -> set[str]:
        tree = ast.parse((package / f"{module}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "rollout_lab.loop" in imported("calibrate")
    assert not {m for m in imported("loop") | imported("tolerances") if m.startswith("rollout_lab.calibrate")}


def test_a_pressure_preset_uses_its_values_for_the_model_that_runs(compose):
    attention = compose("+pressure=kv_tight")
    hybrid = compose("+pressure=kv_tight", "model=hybrid-tiny")
    assert attention.engine.max_model_len == 256 and attention.workload.max_tokens == 32
    assert hybrid.engine.max_model_len == 512 and hybrid.workload.max_tokens == 240
    assert hybrid.engine.kv_cache_memory_bytes < attention.engine.kv_cache_memory_bytes
    assert not hybrid.engine.enable_prefix_caching
    # Keys preset for neither model stay as the preset set them.
    assert hybrid.engine.max_num_seqs == attention.engine.max_num_seqs == 32


def test_a_command_line_key_beats_the_presets_per_model_value(compose):
    cfg = compose("+pressure=kv_tight", "model=hybrid-tiny", "engine.max_model_len=300")
    assert cfg.engine.max_model_len == 300 and cfg.workload.max_tokens == 240


def test_a_per_model_value_for_an_unknown_key_is_a_config_error():
    from omegaconf import OmegaConf

    from rollout_lab.presets import apply_pressure_by_model

    cfg = OmegaConf.create({"model": {"name": "m"}, "engine": {"a": 1}, "pressure_by_model": {"m": {"engine": {"nope": 2}}}})
    with pytest.raises(ConfigError, match="pressure_by_model.m.engine.nope"):
        apply_pressure_by_model(cfg, [])


def test_a_fault_preset_runs_with_the_declared_defaults_and_the_users_overrides(compose):
    from rollout_lab.faults import PARAMS

    presets = {p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "fault").glob("*.yaml")}
    assert presets == set(PARAMS) | {"none"}
    for name in PARAMS:
        cfg = validate(compose(f"fault={name}"))
        assert (cfg.fault.name, cfg.fault.params) == (name, PARAMS[name])
    cfg = validate(compose("fault=stale_state", "fault.params.p=0.5"))
    assert cfg.fault.params == {"p": 0.5, "seed": 0}
    assert validate(compose("fault=none")).fault.name is None
    with pytest.raises(ConfigError, match="fault stale_state has no parameter q; it takes p, seed"):
        validate(compose("fault=stale_state", "+fault.params.q=1"))
