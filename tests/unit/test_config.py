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

    from rollout_lab import calibrate

    monkeypatch.setenv("ROLLOUT_LAB_CACHE", str(tmp_path))
    cfg = RunConfig()
    assert calibrate.threshold_for(cfg)[0] == 1e-3
    cfg.trainer.dtype = "bfloat16"
    assert calibrate.threshold_for(cfg)[0] == 1.0
    (tmp_path / "calibration.json").write_text(json.dumps({calibrate.calibration_key("bfloat16"): {"threshold": 0.42}}))
    value, source = calibrate.threshold_for(cfg)
    assert value == 0.42 and "calibration" in source
    cfg.loop.spike_threshold = 0.05
    assert calibrate.threshold_for(cfg) == (0.05, "config loop.spike_threshold")


def test_gpu_shares_fit_the_cluster():
    from rollout_lab.config import gpu_shares

    cfg = RunConfig()
    assert gpu_shares(cfg, 0) == (0.0, 0.0)
    assert gpu_shares(cfg, 1) == (0.5, 0.5)
    assert gpu_shares(cfg, 2) == (1.0, 1.0)
    cfg.loop.num_workers = 3
    assert gpu_shares(cfg, 2) == (0.25, 0.25)
    cfg.ray.trainer_num_gpus = 1.0
    assert gpu_shares(cfg, 2) == (0.25, 1.0)


def compose(overrides):
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rollout_lab.config import apply_pressure_by_model, register

    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base=None):
        return apply_pressure_by_model(hydra_compose("config", overrides=overrides), overrides)


def test_a_pressure_preset_uses_its_values_for_the_model_that_runs():
    from omegaconf import OmegaConf

    attention = OmegaConf.to_object(compose(["+pressure=kv_tight"]))
    hybrid = OmegaConf.to_object(compose(["+pressure=kv_tight", "model=hybrid-tiny"]))
    assert attention.engine.max_model_len == 256 and attention.workload.max_tokens == 32
    assert hybrid.engine.max_model_len == 512 and hybrid.workload.max_tokens == 240
    assert hybrid.engine.kv_cache_memory_bytes < attention.engine.kv_cache_memory_bytes
    assert not hybrid.engine.enable_prefix_caching
    # Keys preset for neither model stay as the preset set them.
    assert hybrid.engine.max_num_seqs == attention.engine.max_num_seqs == 32


def test_a_command_line_key_beats_the_presets_per_model_value():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose(["+pressure=kv_tight", "model=hybrid-tiny", "engine.max_model_len=300"]))
    assert cfg.engine.max_model_len == 300 and cfg.workload.max_tokens == 240


def test_a_per_model_value_for_an_unknown_key_is_a_config_error():
    from omegaconf import OmegaConf

    from rollout_lab.config import apply_pressure_by_model

    cfg = OmegaConf.create({"model": {"name": "m"}, "engine": {"a": 1}, "pressure_by_model": {"m": {"engine": {"nope": 2}}}})
    with pytest.raises(ConfigError, match="pressure_by_model.m.engine.nope"):
        apply_pressure_by_model(cfg, [])
