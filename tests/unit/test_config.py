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
