"""The trainer: a transformers model that recomputes sampled tokens' logprobs and takes GRPO steps."""
from __future__ import annotations

import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion
from trl.trainer.utils import selective_log_softmax

from rollout_lab import weight_sync
from rollout_lab.config import TrainerConfig
from rollout_lab.reference import pad_sequences


def resolve_device(device: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_model(model_path: str, cfg: TrainerConfig):
    """The trainer's model as the config says: its dtype, on its device, with vLLM's batch-invariant
    overrides when asked (the localizer's on-policy check builds the same one)."""
    device = resolve_device(cfg.device)
    if cfg.batch_invariant:
        if device.type != "cuda":
            raise ValueError(f"trainer.batch_invariant needs a CUDA device (vLLM's batch-invariant kernels are Triton), not {device}")
        from rollout_lab import compat

        compat.enable_batch_invariant_mode()
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype)).to(device)


def checkpoint_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The model's weights as its checkpoint on disk holds them, which is what vLLM loads: transformers'
    own conversion mapping reverted (transformers 5 fuses MoE experts into `mlp.experts.gate_up_proj`,
    Mixtral's checkpoint has `block_sparse_moe.experts.N.w1`); models without a mapping keep their names.

    A tied output embedding is sent again under its own name: vLLM CPU 0.32 repacks lm_head
    into a oneDNN handle of its own, and `reload_weights` leaves that handle stale when only
    the input embedding arrives (repro/tied_lm_head_reload/repro.py).
    """
    named = {name: p.detach() for name, p in model.named_parameters()}
    output = model.get_output_embeddings()
    if output is not None and model.config.get_text_config().tie_word_embeddings:
        head_name = next(name for name, module in model.named_modules() if module is output)
        named[f"{head_name}.weight"] = output.weight.detach()
    return list(revert_weight_conversion(model, named).items())


class Trainer:
    """Policy model + optimizer. Sequences are (prompt_token_ids, completion_token_ids) pairs."""

    def __init__(self, model_path: str, cfg: TrainerConfig, seed: int = 0):
        torch.manual_seed(seed)
        torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = build_model(model_path, cfg)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, foreach=True)

    def _completion_logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """Teacher-forced logprob of every completion token, in float32, one tensor per sequence."""
        input_ids, attention_mask = pad_sequences(sequences)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        # Logits at position t predict token t+1. Only completion positions are scored (the
        # vocabulary-wide log-softmax is the costly part), and in float32 even for bf16 training.
        out = []
        for row, (prompt, completion) in enumerate(sequences):
            start, end = len(prompt) - 1, len(prompt) - 1 + len(completion)
            scored = logits[row : row + 1, start:end].float()
            out.append(selective_log_softmax(scored, input_ids[row : row + 1, start + 1 : end + 1])[0])
        return out

    def _micro_batches(self, sequences):
        size = self.cfg.micro_batch_size
        for start in range(0, len(sequences), size):
            yield start, sequences[start : start + size]

    @torch.no_grad()
    def logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """Recompute each completion token's logprob under the current weights."""
        self.model.eval()
        out = []
        for _, chunk in self._micro_batches(sequences):
            out += [lp.cpu().double().numpy() for lp in self._completion_logprobs(chunk)]
        return out

    def update(
        self, sequences: list[tuple[list[int], list[int]]], advantages: np.ndarray
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """One GRPO step; returns each completion token's logprob before the step, and stats.

        On-policy, so the clipped ratio is 1 and the gradient is that of A * log pi per token,
        averaged over all completion tokens of the batch (token-level, as in DAPO and TRL's
        default). The logprobs come from the same forward pass that makes the gradient, so the
        recorded trainer logprob is exactly what the update used, at no extra forward.
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens = sum(len(c) for _, c in sequences)
        total_loss, recomputed = 0.0, []
        for start, chunk in self._micro_batches(sequences):
            logprobs = self._completion_logprobs(chunk)
            loss = sum(
                -(float(advantages[start + i]) * lp).sum() for i, lp in enumerate(logprobs)
            ) / max(num_tokens, 1)
            loss.backward()
            total_loss += float(loss.detach())
            recomputed += [lp.detach().cpu().double().numpy() for lp in logprobs]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        return recomputed, {"loss": total_loss, "grad_norm": float(grad_norm)}

    def named_weights(self, dtype: str) -> list:
        """Weights under their checkpoint names in the engine's dtype, encoded for transport."""
        target = getattr(torch, dtype)
        return weight_sync.encode([(name, w.to("cpu", target)) for name, w in checkpoint_weights(self.model)])

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> np.ndarray:
        """Logprob of tokens 1..n-1 of a fixed sequence, the counterpart of vLLM's prompt logprobs."""
        self.model.eval()
        return self._completion_logprobs([(token_ids[:1], token_ids[1:])])[0].cpu().double().numpy()
