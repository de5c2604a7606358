"""Per-step mismatch metrics between the sampler's and the trainer's token logprobs.

Samples x come from the sampler q; the trainer is p. With log_ratio = log p(x) - log q(x)
(Schulman, "Approximating KL divergence"), the estimators of KL(q || p) are
  k1 = -log_ratio,  k2 = log_ratio**2 / 2,  k3 = exp(log_ratio) - 1 - log_ratio.
exp(log_ratio) is the importance ratio a truncated-IS correction (TIS, verl/TRL) would apply.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def token_metrics(
    sampler_logprob: np.ndarray,
    trainer_logprob: np.ndarray,
    sequence_id: np.ndarray,
    spike_threshold: float,
) -> dict[str, float]:
    """Mismatch metrics over one step's tokens; sequence_id groups tokens into samples."""
    sampler_logprob = np.asarray(sampler_logprob, dtype=np.float64)
    trainer_logprob = np.asarray(trainer_logprob, dtype=np.float64)
    if sampler_logprob.shape != trainer_logprob.shape:
        raise ValueError(f"{sampler_logprob.shape=} differs from {trainer_logprob.shape=}")
    if sampler_logprob.size == 0:
        return {"num_tokens": 0}
    log_ratio = trainer_logprob - sampler_logprob
    abs_diff = np.abs(log_ratio)
    ratio = np.exp(log_ratio)
    _, inverse = np.unique(np.asarray(sequence_id), return_inverse=True)
    per_sequence_max = np.zeros(inverse.max() + 1)
    np.maximum.at(per_sequence_max, inverse, abs_diff)
    return {
        "num_tokens": int(abs_diff.size),
        "abs_diff_mean": float(abs_diff.mean()),
        "abs_diff_max": float(abs_diff.max()),
        "abs_diff_p99": float(np.quantile(abs_diff, 0.99)),
        # On-policy in the strict sense: sampler and trainer agree bitwise (batch-invariant RL).
        "bitwise_equal_fraction": float(np.mean(log_ratio == 0.0)),
        "kl_k1": float(np.mean(-log_ratio)),
        "kl_k2": float(np.mean(0.5 * log_ratio**2)),
        "kl_k3": float(np.mean(ratio - 1.0 - log_ratio)),
        "importance_ratio_min": float(ratio.min()),
        "importance_ratio_mean": float(ratio.mean()),
        "importance_ratio_max": float(ratio.max()),
        "spike_fraction": float(np.mean(abs_diff > spike_threshold)),
        "num_spikes": int(np.sum(abs_diff > spike_threshold)),
        "sequence_max_mean": float(per_sequence_max.mean()),
        "sequences_with_spike_fraction": float(np.mean(per_sequence_max > spike_threshold)),
    }


def group_advantages(rewards: np.ndarray, group_id: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """GRPO advantages: each reward standardized within its prompt's group of samples."""
    rewards = np.asarray(rewards, dtype=np.float64)
    advantages = np.zeros_like(rewards)
    for g in np.unique(group_id):
        mask = group_id == g
        group = rewards[mask]
        # A group whose samples all scored the same carries no signal.
        if group.std() > 0:
            advantages[mask] = (group - group.mean()) / (group.std() + eps)
    return advantages


def weight_sync_exercised(policy_changes: list[float], tolerance: float) -> Optional[bool]:
    """Whether the probe moved past the weight-sync tolerance at some step (None: no step was checked);
    if not, a sync that left vLLM on its old weights would have passed the check too."""
    return max(policy_changes) > tolerance if policy_changes else None
