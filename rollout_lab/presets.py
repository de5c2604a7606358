"""Pressure presets (conf/pressure/): the values a preset lists per model, merged into a composed config."""
from __future__ import annotations

from typing import Optional

from rollout_lab.config import ConfigError


def override_keys(overrides: list[str]) -> set[str]:
    """The dotted keys a list of Hydra command-line overrides sets ("+a.b=1" -> "a.b")."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def model_pressure(preset, model: Optional[str]):
    """The values a pressure preset (a dict as in conf/pressure/, or the composed config) lists for
    `model` under pressure_by_model, or {}: the one place that knows that layout."""
    return (preset.get("pressure_by_model") or {}).get(model) or {}


def apply_pressure_by_model(cfg, overrides: list[str]):
    """The composed config with its pressure preset's values for cfg.model.name merged in.

    A hybrid model's attention blocks hold 256 tokens, so the cache sizes and request lengths that
    force preemptions differ by architecture; a preset lists them under pressure_by_model.<model>.
    Keys set on the command line (or by a sweep) keep their value."""
    from omegaconf import OmegaConf

    values = model_pressure(cfg, cfg.model.name)
    if not values:
        return cfg
    given = override_keys(overrides)
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            elif path not in given:
                flat[path] = value

    walk(OmegaConf.to_container(values), "")
    for path, value in flat.items():
        if OmegaConf.select(cfg, path, default="<missing>") == "<missing>":
            raise ConfigError(f"pressure_by_model.{cfg.model.name}.{path}: no such key in the run config")
        OmegaConf.update(cfg, path, value, merge=False)
    return cfg
