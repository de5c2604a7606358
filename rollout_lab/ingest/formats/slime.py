"""slime: the rollout_{id}.pt files of --save-debug-rollout-data, a torch pickle of Sample dicts.

Each Sample: `tokens` (prompt + response), `response_length`, `loss_mask`, `rollout_log_probs`
(the sampler's, one per response token), `reward`, `weight_versions` (the policy version of
the engine's weights, per turn), `prefix_cache_info.cached_tokens`. slime keeps no trainer
logprobs: the ingest computes them with --model. Files are loaded with weights_only=True (plain
data only), one at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator

from rollout_lab.ingest.formats.base import ExportFormat, glob_files, number_in, require
from rollout_lab.ingest.sequence import ExportError, ExportedSequence

STEP = r"rollout_(\d+)\.pt"


def _version(versions) -> int | None:
    """The oldest policy version a sample's turns were sampled with (slime writes them as strings)."""
    if versions is None:
        return None
    values = [int(v) for v in (versions if isinstance(versions, (list, tuple)) else [versions])]
    return min(values) if values else None


def sequence(sample: dict, step: int, where: str) -> ExportedSequence:
    """One Sample dict as an ExportedSequence (pure: unit-tested)."""
    require(sample, ("tokens", "response_length", "rollout_log_probs"), where)
    n = int(sample["response_length"])
    tokens = list(sample["tokens"])
    cached = (sample.get("prefix_cache_info") or {}).get("cached_tokens")
    reward = sample.get("reward")
    return ExportedSequence(
        step=step,
        prompt_token_ids=tokens[: len(tokens) - n],
        token_ids=tokens[len(tokens) - n :],
        sampler_logprobs=[float(x) for x in sample["rollout_log_probs"]],
        reward=float(reward) if isinstance(reward, (int, float)) else None,
        request_id=str(sample.get("index", "")) or None,
        prompt_index=sample.get("group_index"),
        num_cached_tokens=int(cached) if cached is not None else None,
        weight_version=_version(sample.get("weight_versions")),
    ).check(where)


def _sequences(file: BinaryIO, path: Path, tokenizer) -> Iterator[ExportedSequence]:
    import pickle

    import torch

    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ExportError(f"{path} is not a slime rollout file of plain data ({str(exc).splitlines()[0]})") from None
    samples = data.get("samples") if isinstance(data, dict) else data
    if not isinstance(samples, list):
        raise ExportError(f"{path}: expected a list of samples or a dict with 'samples', got {type(data).__name__}")
    step = int(data.get("rollout_id", number_in(path, STEP))) if isinstance(data, dict) else number_in(path, STEP)
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise ExportError(f"{path} sample {i}: not a dict of fields ({type(sample).__name__})")
        yield sequence(sample, step, f"{path} sample {i}")


FORMAT = ExportFormat(
    name="slime",
    reads="rollout_{id}.pt (--save-debug-rollout-data): tokens, response_length, rollout_log_probs (sampler), reward, "
          "weight_versions, prefix_cache_info.cached_tokens; the trainer side is computed",
    files=lambda path: glob_files(path, "**/rollout_*.pt", "slime rollout_*.pt files", lambda p: number_in(p, STEP)),
    sequences=_sequences,
)
