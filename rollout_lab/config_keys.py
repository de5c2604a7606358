"""Every key a user types, checked against its schema: a typo must not run another configuration.

Hydra's `+key=value` adds a key even where the schema has none (it opens the struct), so the
composed config (check_keys) and a multirun's grid (check_override_keys, the CheckOverrideKeys
callback of conf/config.yaml) are walked key by key, each unknown one a line naming the closest.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any, Optional, get_type_hints

from hydra.experimental.callback import Callback

from rollout_lab.config import ConfigError, RunConfig, closest
from rollout_lab.engine import engine_arg_message

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@functools.cache
def schema_keys(schema: type, prefix: str = "") -> dict[str, bool]:
    """Every dotted key of a config dataclass -> whether it takes free sub-keys (a dict field).
    Cached: check_keys asks once per key of a composed config."""
    keys = {}
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        path, kind = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys[path] = False
            keys |= schema_keys(kind, path + ".")
        else:
            keys[path] = getattr(kind, "__origin__", None) is dict
    return keys


def unknown_key_message(key: str, schema: type) -> Optional[str]:
    """One line naming `key` and the closest valid keys when the schema has no such key, else None.

    Hydra's `+key=value` adds a key even where the schema has none (it opens the struct), so
    every key a user types is checked here: a typo must not run another configuration."""
    keys = schema_keys(schema)
    parts = key.split(".")
    for depth in range(1, len(parts) + 1):
        head = ".".join(parts[:depth])
        if head not in keys:
            break
        if keys[head]:
            return None  # fault.params.<name>, pressure_by_model.<model>...: checked where they are read
    else:
        return None
    parent = ".".join(parts[:depth - 1])
    siblings = [k.rsplit(".", 1)[-1] for k in keys if k.rpartition(".")[0] == parent]
    if not siblings:
        return f"unknown config key {key!r}; {parent} is a value and takes no sub-keys"
    return f"unknown config key {key!r}; {closest(parts[depth - 1], siblings, parent)}"


def check_keys(dict_cfg, schema: type) -> None:
    """Raise ConfigError naming the first key of a composed config that its schema lacks."""
    from omegaconf import OmegaConf

    keys = schema_keys(schema)

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            path = f"{prefix}{key}"
            message = unknown_key_message(path, schema)
            if message:
                raise ConfigError(message)
            if isinstance(value, dict) and not keys.get(path, True):
                walk(value, path + ".")

    tree = OmegaConf.to_container(dict_cfg, resolve=False)
    tree.pop("hydra", None)
    walk(tree, "")


def check_override_keys(overrides: list[str], schema: type) -> None:
    """Raise ConfigError on a command-line override (a sweep grid too) whose key the schema lacks.

    Config groups (the folders of conf/: model=, +pressure=, +sweep=, fault=) and hydra.* are
    Hydra's to check; an engine.args.<name> is checked against the installed vLLM's EngineArgs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in groups or key.split(".")[0] == "hydra":
            continue
        message = unknown_key_message(key, schema)
        if message is None and schema is RunConfig and key.startswith("engine.args."):
            message = engine_arg_message(key.split(".")[2])
        if message:
            raise ConfigError(message)


class CheckOverrideKeys(Callback):
    """Hydra callback (conf/config.yaml): a multirun whose grid names an unknown key stops before
    its first job, with one line, instead of failing (or silently running) once per job."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        try:
            check_override_keys(list(config.hydra.overrides.task), RunConfig)
        except ConfigError as exc:
            print(f"rollout_lab: {exc}", file=sys.stderr)
            sys.exit(2)
