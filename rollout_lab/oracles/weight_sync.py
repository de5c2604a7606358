"""The weight-sync oracle of the RL loop: after each sync, vLLM's probe logprobs against the trainer's."""
from __future__ import annotations

from typing import Optional

from rollout_lab.oracles.base import Oracle, register


class WeightSync(Oracle):
    name = "weight_sync"
    # A run it fails ends with summary.json status sync_mismatch (loop.check_sync); no hunt trial judges it.
    signature_kind = "sync_mismatch"

    # It judges the RL loop's probe, not a hunt trial: its bound comes from the run's RunConfig (`bound`),
    # so the hunt-facing `tolerance(oracles, row)` stays the base's.
    def bound(self, cfg) -> float:
        """The bound on the probe for a RunConfig `cfg` (tolerances.weight_sync_tolerance)."""
        from rollout_lab.tolerances import weight_sync_tolerance

        return weight_sync_tolerance(cfg)

    def synced(self, max_abs_diff: float, bound: float) -> bool:
        """Whether the probe's largest |vLLM - trainer| logprob difference passes."""
        return max_abs_diff <= bound

    def why_not_minimized(self) -> Optional[str]:
        return "a weight-sync mismatch needs the trainer's new weights; the minimizer replays sampling on fixed weights"


register(WeightSync())
