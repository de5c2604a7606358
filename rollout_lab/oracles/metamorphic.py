"""The metamorphic oracle: |sampled logprob - the same sequence re-scored alone| on the same engine
(one request at a time, a prefill with prompt_logprobs: no batch, no cached prefix, no preemption)."""
from __future__ import annotations

from typing import Optional

from rollout_lab.oracles.base import Oracle, Trial, register
from rollout_lab.oracles.records import OracleVerdict, token_verdict


class Metamorphic(Oracle):
    name = "metamorphic"
    order = 1

    def tolerance(self, oracles, row: str) -> float:
        return float(oracles.metamorphic_tolerance[row])

    def measure(self, trial: Trial) -> OracleVerdict:
        return token_verdict(trial.items, [item.rescored for item in trial.items], trial.tolerances[self.name])

    def why_not_minimized(self) -> Optional[str]:
        # The reference oracle ran and passed the sampled logprobs: the re-scoring pass
        # (prompt_logprobs, one request alone) is the side that went wrong.
        return ("the sampled logprobs match the float32 reference; the re-scoring pass (prompt_logprobs, "
                "alone) disagreed with both, and the minimizer replays sampling, not prompt_logprobs")

    def console(self, verdict: OracleVerdict) -> str:
        return f"|alone| {verdict.max_diff:.2g}"


register(Metamorphic())
