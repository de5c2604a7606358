import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true",
                     help="run the selected tests in reverse order: a test that needs another's side effects fails")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    # trylast: after pytest has grouped the items by fixture scope, so a module's tests stay together.
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session; runs reuse it."""
    import ray

    ray.init(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def compose():
    """compose(*overrides) -> the RunConfig `python -m rollout_lab OVERRIDES` runs: conf/ as
    shipped, the presets' own values, the per-model pressure values (rollout_lab/__main__.py)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from rollout_lab.config import RunConfig, register
    from rollout_lab.config_keys import check_keys
    from rollout_lab.presets import apply_pressure_by_model

    register()

    def build(*overrides: str) -> RunConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides))
        check_keys(cfg, RunConfig)
        return OmegaConf.to_object(apply_pressure_by_model(cfg, list(overrides)))

    return build
