"""Every key a user types lands in the typed config or fails at start with one line (issue 21)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rollout_lab.config import ConfigError, RunConfig, register
from rollout_lab.config_keys import CONF_DIR, check_keys, check_override_keys, unknown_key_message
from rollout_lab.hunt.space import HuntRunConfig, Space
from rollout_lab.hunt.space import register as register_hunt

register()
register_hunt()
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "key, expected",
    [
        ("engine.bogus", "valid keys under engine: device, dtype"),
        ("workload.num_promts", "did you mean workload.num_prompts?"),
        ("engine.enable_prefix_cachng", "did you mean engine.enable_prefix_caching?"),
        ("engine.dtype.x", "engine.dtype is a value and takes no sub-keys"),
        ("bogus", "valid keys under the top level: model, engine"),
    ],
)
def test_unknown_keys_are_named_with_the_closest_valid_ones(key, expected):
    message = unknown_key_message(key, RunConfig)
    assert message.startswith(f"unknown config key {key!r}") and expected in message and "\n" not in message


@pytest.mark.parametrize("key", ["engine.dtype", "model.name", "fault.params.p", "pressure_by_model.smollm2.engine.block_size", "run_name"])
def test_known_keys_and_free_dicts_pass(key):
    assert unknown_key_message(key, RunConfig) is None


def test_grid_overrides_are_checked_but_groups_are_hydras():
    check_override_keys(["+pressure=kv_tight", "+sweep=cache_size", "fault=stale_state", "model=hybrid-tiny",
                         "engine.seed=1,2", "hydra.launcher.max_parallel_jobs=2"], RunConfig)
    with pytest.raises(ConfigError, match="did you mean engine.max_num_seqs"):
        check_override_keys(["+engine.max_num_seq=1,2,8"], RunConfig)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "overrides",
    [[f"model={m}"] for m in _options("model")]
    + [[f"fault={f}"] for f in _options("fault")]
    + [[f"+pressure={p}"] for p in _options("pressure")]
    + [[f"+sweep={s}"] for s in _options("sweep")],
)
def test_every_preset_composes_with_known_keys_only(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    check_keys(cfg, RunConfig)
    OmegaConf.to_object(cfg)


@pytest.mark.parametrize("hunt", _options("hunt"))
def test_every_hunt_space_composes_and_names_real_knobs(hunt):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("hunt_run", overrides=[f"hunt={hunt}"])
    check_keys(cfg, HuntRunConfig)
    Space.from_config(OmegaConf.to_object(cfg).hunt.space)


def test_a_misspelled_engine_knob_in_the_hunt_space_is_refused():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("hunt_run", overrides=["hunt=smoke", "+hunt.space.engine.max_num_seq=[4]"])
    with pytest.raises(ConfigError, match=r"hunt.space.engine.max_num_seq is not a knob: did you mean hunt.space.engine.max_num_seqs\b"):
        Space.from_config(OmegaConf.to_object(cfg).hunt.space)


def _cli(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """The command a user types, from another working directory."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "module, args, key",
    [
        ("rollout_lab", ["+engine.bogus=1", "loop.steps=1"], "engine.bogus"),
        ("rollout_lab", ["+workload.num_promts=2"], "workload.num_promts"),
        ("rollout_lab", ["-m", "+engine.max_num_seq=1,2"], "engine.max_num_seq"),
        ("rollout_lab", ["-m", "engine.max_num_seqs=1,2", "+engine.enable_prefix_cachng=false"], "engine.enable_prefix_cachng"),
        ("rollout_lab.hunt", ["+hunt.budgets_s=5"], "hunt.budgets_s"),
    ],
)
def test_the_cli_fails_at_start_with_one_line(tmp_path, module, args, key):
    result = _cli(tmp_path, module, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "unknown config key" in line]
    assert len(lines) == 1 and f"unknown config key {key!r}" in lines[0], result.stderr[-2000:]
    # Nothing ran: a multirun stops before its first job, a run before its engine.
    assert not list(tmp_path.glob("multirun/*/*/0")) and not list(tmp_path.glob("runs/**/summary.json"))
