"""Batch invariance and run-to-run determinism, measured bitwise on the engine configuration given.

    python -m rollout_lab.invariance                                  # smollm2, float32, mode off and on
    python -m rollout_lab.invariance engine.dtype=bfloat16 invariance.modes=[greedy]

A few target requests are sampled alone (the reference), then inside batches of other requests
at the front and at the back, greedy and with per-request seeds; then the largest batch again on
the same engine, and the targets alone again on a fresh engine. Each target's output is compared
bitwise with its reference: the sampled tokens, each sampled token's logprob and the top-k
logprobs, position by position up to the first differing token. vLLM's own test
(test_logprobs_bitwise_batch_invariance_bs1_vs_bsN) is the model.

Each setting of vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT, read when vLLM is imported)
runs in its own spawned process. Where vLLM promises invariance (the mode on, on a CUDA device of
compute capability 8.0 or newer) any difference is a finding: the verdict line says
BROKEN and the exit status is 1. Elsewhere the differences are the batch-composition noise
floor, which bounds what any logprob-mismatch oracle can resolve: reported, exit 0.
Writes invariance.json and INVARIANCE.md into the run dir.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty
from typing import Optional

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from rollout_lab import engine as engines
from rollout_lab.config import EngineConfig, ModelConfig, WorkloadConfig

MODES = ("greedy", "seeded")
# Conditions compared with the targets' reference (each alone, first engine).
FRESH_ENGINE, REPEAT = "fresh engine, alone", "same batch again"


@dataclass
class InvarianceConfig:
    num_targets: int = 4
    # Batch sizes the targets are placed in, besides alone; filled with other prompts.
    batch_sizes: list[int] = field(default_factory=lambda: [8, 32])
    max_tokens: int = 16
    top_logprobs: int = 5
    modes: list[str] = field(default_factory=lambda: list(MODES))
    # The settings of vLLM's batch-invariant mode compared, one spawned process each
    # (engine.batch_invariant is set from this list).
    batch_invariant: list[bool] = field(default_factory=lambda: [False, True])


@dataclass
class InvarianceRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Only prompt_seed is read: which arithmetic prompts are the targets and the fillers.
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    invariance: InvarianceConfig = field(default_factory=InvarianceConfig)
    run_dir: Optional[str] = None


@dataclass
class Output:
    """One request's sampled tokens, their logprobs and the top-k logprobs at each position."""

    tokens: list[int]
    logprobs: list[float]
    top: list[dict[int, float]]


@dataclass
class Comparison:
    """One output against its reference, bitwise, up to the first differing token."""

    condition: str
    mode: str
    target: int
    compared: int  # positions compared: up to and including the first differing token
    equal: int  # of those, positions whose sampled-token logprob is bitwise equal
    max_abs_diff: float
    first_token_diff: Optional[int]  # first position whose sampled token differs, None if none
    top_equal: bool  # every compared position's top-k ids and values bitwise equal

    @property
    def identical(self) -> bool:
        return self.first_token_diff is None and self.equal == self.compared and self.top_equal


def compare(reference: Output, other: Output, condition: str, mode: str, target: int) -> Comparison:
    """Bitwise comparison of `other` with `reference`. At the first differing token the sampled
    logprobs belong to different tokens, so that position compares the top-k only."""
    first = next((i for i, (a, b) in enumerate(zip(reference.tokens, other.tokens)) if a != b), None)
    if first is None and len(reference.tokens) != len(other.tokens):
        first = min(len(reference.tokens), len(other.tokens))
    same = min(len(reference.tokens), len(other.tokens)) if first is None else first
    ref_lp, oth_lp = np.array(reference.logprobs[:same]), np.array(other.logprobs[:same])
    equal = int(np.sum(ref_lp == oth_lp))
    diff = float(np.max(np.abs(ref_lp - oth_lp))) if same else 0.0
    upto = same + (first is not None and first < min(len(reference.top), len(other.top)))
    top_equal = all(reference.top[i] == other.top[i] for i in range(upto))
    return Comparison(condition, mode, target, same + (first is not None), equal, diff, first, top_equal)


@dataclass
class Row:
    """Comparisons of one condition and mode, summed over targets: a line of the report."""

    batch_invariant: bool
    condition: str
    mode: str
    targets: int
    identical: int
    bitwise_equal_share: float
    max_abs_diff: float
    first_token_diff: Optional[int]


def summarize(batch_invariant: bool, comparisons: list[Comparison]) -> list[Row]:
    """One Row per (condition, mode), in first-seen order."""
    keys = list(dict.fromkeys((c.condition, c.mode) for c in comparisons))
    rows = []
    for condition, mode in keys:
        group = [c for c in comparisons if (c.condition, c.mode) == (condition, mode)]
        compared = sum(c.compared for c in group)
        firsts = [c.first_token_diff for c in group if c.first_token_diff is not None]
        rows.append(Row(batch_invariant, condition, mode, len(group), sum(c.identical for c in group),
                        sum(c.equal for c in group) / compared if compared else 1.0,
                        max(c.max_abs_diff for c in group), min(firsts) if firsts else None))
    return rows


@dataclass
class SettingResult:
    """What one process (one setting of the mode) measured."""

    batch_invariant: bool
    promised: bool  # vLLM promises invariance here: the mode on, on a supported device
    device: str
    vllm_version: str
    rows: list[Row]
    tokens_per_s: float  # generated tokens per second over the largest batch, first engine
    seconds: float
    error: Optional[str] = None

    @property
    def broken(self) -> bool:
        return self.promised and any(r.identical < r.targets for r in self.rows)


def promises_invariance(batch_invariant: bool) -> bool:
    """Whether vLLM promises batch invariance here (its docs: NVIDIA compute capability >= 8.0)."""
    if not batch_invariant:
        return False
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda() and current_platform.has_device_capability(80))


def output_of(sampled: engines.SampledOutput) -> Output:
    """A completion sampled with logprobs as an Output."""
    return Output(sampled.token_ids, sampled.logprobs, sampled.top_logprobs)


def _outputs(llm, prompts: list[list[int]], params: list) -> list[Output]:
    return [output_of(sampled) for sampled in engines.generate(llm, prompts, params)]


def _params(mode: str, cfg: InvarianceConfig, seeds: list[int]) -> list:
    if mode == "greedy":
        return [engines.sampling_params(None, temperature=0.0, max_tokens=cfg.max_tokens, logprobs=cfg.top_logprobs) for _ in seeds]
    return [engines.sampling_params(s, temperature=1.0, max_tokens=cfg.max_tokens, logprobs=cfg.top_logprobs) for s in seeds]


class Engine:
    """The targets, the fillers and their sampling params on one engine configuration."""

    def __init__(self, run: InvarianceRunConfig):
        from transformers import AutoTokenizer

        from rollout_lab.models import resolve_model
        from rollout_lab.workload import encode_prompt, make_problems

        self.cfg = run.invariance
        model_path = resolve_model(run.model.name)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        prompts = [encode_prompt(tokenizer, p) for p in make_problems(self.cfg.num_targets + max(self.cfg.batch_sizes), run.workload.prompt_seed)]
        self.targets, self.fillers = prompts[: self.cfg.num_targets], prompts[self.cfg.num_targets:]
        self.seeds = [run.engine.seed * 1000 + i for i in range(len(prompts))]
        # vLLM as shipped: no scheduler hook, no worker extension.
        self.kwargs = {k: v for k, v in engines.engine_kwargs(run, model_path).items() if k not in ("scheduler_cls", "worker_extension_cls")}
        self.llm = None

    def start(self) -> None:
        if self.llm is not None:
            del self.llm
            import gc

            gc.collect()
        self.llm = engines.start(**self.kwargs)

    def alone(self, mode: str) -> list[Output]:
        """Each target in a batch of its own."""
        params = _params(mode, self.cfg, self.seeds[: len(self.targets)])
        return [_outputs(self.llm, [p], [q])[0] for p, q in zip(self.targets, params)]

    def batch(self, mode: str, size: int, where: str) -> tuple[list[Output], float]:
        """The targets at the front or the back of a batch of `size` (fillers around them), and
        the batch's generated tokens per second."""
        others = max(size - len(self.targets), 0)
        params = _params(mode, self.cfg, self.seeds)
        target_params, filler_params = params[: len(self.targets)], params[len(self.targets): len(self.targets) + others]
        if where == "front":
            prompts, params = self.targets + self.fillers[:others], target_params + filler_params
        else:
            prompts, params = self.fillers[:others] + self.targets, filler_params + target_params
        started = time.perf_counter()
        outputs = _outputs(self.llm, prompts, params)
        rate = sum(len(o.tokens) for o in outputs) / (time.perf_counter() - started)
        return (outputs[: len(self.targets)] if where == "front" else outputs[others:]), rate


def measure(run: InvarianceRunConfig, batch_invariant: bool) -> SettingResult:
    """Inside the spawned process: every condition for one setting of the mode."""
    run.engine.batch_invariant = batch_invariant
    os.environ["VLLM_BATCH_INVARIANT"] = "1" if batch_invariant else "0"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm.platforms import current_platform

    started = time.perf_counter()
    engine, cfg = Engine(run), run.invariance
    engine.start()
    comparisons, references, tokens_per_s = [], {}, 0.0

    def against(reference, outputs, condition, mode):
        return [compare(r, o, condition, mode, i) for i, (r, o) in enumerate(zip(reference, outputs))]

    for mode in cfg.modes:
        references[mode] = engine.alone(mode)
        for size in cfg.batch_sizes:
            for where in ("front", "back"):
                outputs, rate = engine.batch(mode, size, where)
                comparisons += against(references[mode], outputs, f"batch of {size}, targets at the {where}", mode)
                if size == max(cfg.batch_sizes):
                    tokens_per_s = max(tokens_per_s, rate)
                    if where == "back":
                        comparisons += against(outputs, engine.batch(mode, size, where)[0], REPEAT, mode)
    engine.start()
    for mode in cfg.modes:
        comparisons += against(references[mode], engine.alone(mode), FRESH_ENGINE, mode)
    return SettingResult(batch_invariant, promises_invariance(batch_invariant), str(current_platform.device_name),
                         vllm.__version__, summarize(batch_invariant, comparisons), tokens_per_s, time.perf_counter() - started)


def _child(run, batch_invariant: bool, queue) -> None:
    try:
        queue.put(measure(run, batch_invariant))
    except Exception as exc:  # reported as that setting's result; the other setting still runs
        from rollout_lab.crash import crash_signature

        signature = crash_signature(exc, phase="invariance")
        queue.put(SettingResult(batch_invariant, False, "", "", [], 0.0, 0.0, f"{signature.key}: {signature.message}"))


def run_setting(run, batch_invariant: bool) -> SettingResult:
    """One setting of the mode in a spawned process (vLLM reads VLLM_BATCH_INVARIANT at import)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(run, batch_invariant, queue))
    process.start()
    return child_result(process, queue, batch_invariant)


def child_result(process, queue, batch_invariant: bool) -> SettingResult:
    """The setting's result from its child process; a child that died without one (the OOM killer, a
    segfault) is that setting's error, never a wait without end."""
    result = None
    while result is None:
        alive = process.is_alive()
        try:
            result = queue.get(timeout=1.0)
        except Empty:
            if not alive:  # dead before this wait began, and nothing came during it
                code = process.exitcode
                how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
                result = SettingResult(batch_invariant, False, "", "", [], 0.0, 0.0,
                                       f"the measuring process died without a result: {how}")
    process.join()
    return result


def report(run, results: list[SettingResult]) -> str:
    """INVARIANCE.md: one table of every setting, condition and mode, and the verdict."""
    lines = [f"# Batch invariance: {run.model.name}, {run.engine.dtype}", ""]
    for r in results:
        if r.error:
            lines.append(f"- VLLM_BATCH_INVARIANT={int(r.batch_invariant)}: could not run: {r.error}")
        else:
            promise = "vLLM promises invariance here" if r.promised else "no promise here (noise floor)"
            lines.append(f"- VLLM_BATCH_INVARIANT={int(r.batch_invariant)}: vLLM {r.vllm_version} on {r.device}; {promise}; "
                         f"{r.tokens_per_s:.0f} generated tokens/s in the largest batch; {r.seconds:.0f} s")
    lines += ["", "| mode on | condition | sampling | identical targets | bitwise-equal logprobs | max abs diff | first token diff |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for row in r.rows:
            first = "-" if row.first_token_diff is None else f"position {row.first_token_diff}"
            lines.append(f"| {'yes' if row.batch_invariant else 'no'} | {row.condition} | {row.mode} | {row.identical}/{row.targets} | "
                         f"{row.bitwise_equal_share:.1%} | {row.max_abs_diff:.3g} | {first} |")
    lines += ["", verdict(results)]
    return "\n".join(lines) + "\n"


def verdict(results: list[SettingResult]) -> str:
    """The one line a person reads first."""
    broken = [r for r in results if r.broken]
    if broken:
        return "BROKEN: vLLM promises batch invariance with VLLM_BATCH_INVARIANT=1 here and a target's output changed with the batch or the run"
    floor = max((row.max_abs_diff for r in results for row in r.rows), default=0.0)
    errors = [r for r in results if r.error]
    if errors and len(errors) == len(results):
        return "CANNOT RUN: " + "; ".join(r.error for r in errors)
    return f"HOLDS where promised; batch-composition noise floor elsewhere: max |diff| {floor:.3g}"


ConfigStore.instance().store(name="invariance_schema", node=InvarianceRunConfig)


@hydra.main(version_base=None, config_path="../conf", config_name="invariance_run")
def main(dict_cfg) -> None:
    from rich.console import Console

    from rollout_lab.config import ConfigError
    from rollout_lab.config_keys import check_keys

    try:
        check_keys(dict_cfg, InvarianceRunConfig)
        run: InvarianceRunConfig = OmegaConf.to_object(dict_cfg)
        unknown = set(run.invariance.modes) - set(MODES)
        if unknown:
            raise ConfigError(f"invariance.modes: {sorted(unknown)[0]!r} is not valid; choose from {', '.join(MODES)}")
    except ConfigError as exc:
        print(f"rollout_lab.invariance: {exc}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(run.run_dir or HydraConfig.get().runtime.output_dir)
    console = Console()
    results = []
    for setting in run.invariance.batch_invariant:
        with console.status(f"VLLM_BATCH_INVARIANT={int(setting)}: an engine in a fresh process, {len(run.invariance.modes)} sampling modes ..."):
            results.append(run_setting(run, setting))
    text = report(run, results)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "INVARIANCE.md").write_text(text)
    (run_dir / "invariance.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(text)
    console.print(f"written: {run_dir / 'INVARIANCE.md'}")
    sys.exit(1 if any(r.broken for r in results) else 0)


if __name__ == "__main__":
    main()
