"""Hooks for users who want the lab's full records from their own trainer, both writing the generic
schema (rollout_lab/ingest/sequence.py) that `python -m rollout_lab.ingest generic <path>` reads.

    write_rollouts(path, step, prompt_ids, completion_ids, ...)   verl / OpenRLHF: the padded tensors
                                                                  (or lists) a step already holds
    RolloutLabCallback(trainer, path)                             TRL GRPOTrainer: every generation
                                                                  batch, vLLM's and the trainer's logprobs
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from transformers import TrainerCallback

from rollout_lab.ingest.sequence import ExportedSequence, to_dict


def _rows(values, mask=None) -> list[list]:
    """A [batch, length] tensor or nested list as one list per row, keeping only positions where mask is 1."""
    values = values.tolist() if hasattr(values, "tolist") else [list(v) for v in values]
    if mask is None:
        return values
    mask = mask.tolist() if hasattr(mask, "tolist") else mask
    return [[v for v, m in zip(row, keep) if m] for row, keep in zip(values, mask)]


def write_rollouts(path: Path, step: int, prompt_ids, completion_ids, sampler_logprobs=None, trainer_logprobs=None,
                   rewards: Optional[Sequence[float]] = None, prompt_mask=None, completion_mask=None,
                   weight_version: Optional[int] = None, worker: int = 0, temperature: Optional[float] = None,
                   top_p: Optional[float] = None, top_k: Optional[int] = None) -> int:
    """Append one step's completions to a generic-schema JSONL file; masks drop padding. Returns the rows written.

    Logprobs are per completion token (the logprob of that token), e.g. verl's `rollout_log_probs`
    (sampler) and `old_log_probs` (trainer), OpenRLHF's `action_log_probs`."""
    import json

    prompts = _rows(prompt_ids, prompt_mask)
    completions = _rows(completion_ids, completion_mask)
    sampler = _rows(sampler_logprobs, completion_mask) if sampler_logprobs is not None else [None] * len(completions)
    trainer = _rows(trainer_logprobs, completion_mask) if trainer_logprobs is not None else [None] * len(completions)
    rewards = list(rewards.tolist() if hasattr(rewards, "tolist") else rewards) if rewards is not None else [None] * len(completions)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for i, (p, c, s, t, r) in enumerate(zip(prompts, completions, sampler, trainer, rewards, strict=True)):
            sequence = ExportedSequence(step=step, prompt_token_ids=[int(x) for x in p], token_ids=[int(x) for x in c],
                                        sampler_logprobs=s, trainer_logprobs=t, reward=r, worker=worker,
                                        request_id=f"{worker}-{step}-{i}", weight_version=weight_version,
                                        temperature=temperature, top_p=top_p, top_k=top_k).check(f"{path} step {step} row {i}")
            f.write(json.dumps(to_dict(sequence)) + "\n")
    return len(completions)


class RolloutLabCallback(TrainerCallback):
    """A TRL TrainerCallback that writes every GRPOTrainer generation batch of the main process in the
    generic schema: vLLM's logprobs (`sampling_per_token_logps`, with use_vllm and
    vllm_importance_sampling_correction) and the trainer's (`old_per_token_logps`, when TRL computes them).
    Use: `trainer.add_callback(RolloutLabCallback(trainer, "rollouts.jsonl"))`."""

    def __init__(self, trainer, path: Path):
        self.trainer, self.path = trainer, Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, generate = self.trainer, self.trainer._generate_and_score_completions

        def recording(*a, **kw):
            output = generate(*a, **kw)
            # One writer: the ingest reads a file in step order, which several ranks appending would break.
            if trainer.accelerator.is_main_process:
                write_rollouts(self.path, state.global_step, output["prompt_ids"], output["completion_ids"],
                               output.get("sampling_per_token_logps"), output.get("old_per_token_logps"),
                               prompt_mask=output["prompt_mask"], completion_mask=output["completion_mask"],
                               weight_version=state.global_step)
            return output

        trainer._generate_and_score_completions = recording
