"""The pipeline diagnoses: one interface (Diagnosis: observe one step's tokens, say which it explains,
then a Finding or None) and its registry (DIAGNOSES); diagnose.py runs them over a run dir.

    Context (threshold, noise floor, run dir) -> Diagnosis.observe(step, tokens) per step -> Finding
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from rollout_lab.noise_floor import NoiseFloor
from rollout_lab.records import RecordsError, read_requests

# A trainer logprob below this is a low probability (p < 0.5): a side reading exactly 0.0 there is a fill value.
LOW_LOGPROB = math.log(0.5)
# A logprob at or below this is a sentinel, not a probability any model gives (-1e4, -9999, -inf).
SENTINEL_LOGPROB = -1e3
# Fewest tokens a pattern needs before it is named.
MIN_TOKENS = 8
# Share of flagged tokens a one-sided pattern (truncation, shift) must hold.
ONE_SIDED_SHARE = 0.98
# Stale weights without versions: every later step flags at least this share of its requests.
BROAD_SHARE = 0.8


@dataclass
class Finding:
    """One named diagnosis that applies, with the numbers behind it."""

    name: str
    title: str
    # Flagged tokens it explains (a token can be explained by more than one).
    tokens: int
    evidence: list[str]
    example: dict = field(default_factory=dict)


@dataclass
class Context:
    """What every diagnosis may consult: the flagging threshold, the floor, the run dir."""

    run_dir: Path
    threshold: float
    floor: Optional[NoiseFloor]

    @property
    def bar(self) -> float:
        """The least |difference| that is evidence: above the threshold and the trainer's own floor."""
        return max(self.threshold, self.floor.abs_diff_max if self.floor else 0.0)


class Diagnosis:
    """Observe steps one at a time, then say whether the pattern holds."""

    name = ""
    title = ""

    def __init__(self, context: Context):
        self.context = context

    def observe(self, step: int, tokens: pd.DataFrame) -> np.ndarray:
        """The tokens (rows of one step, ordered by request and position) this diagnosis would explain."""
        raise NotImplementedError

    def finding(self) -> Optional[Finding]:
        raise NotImplementedError


def _example(row: pd.Series) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row[["step", "worker", "request_id", "position", "token_id",
                                                                         "sampler_logprob", "trainer_logprob"]].items()}


class FillValue(Diagnosis):
    """A side holding exactly 0.0 (or a sentinel) where the other gives a low probability."""

    name, title = "fill_value", "logprobs of exactly 0.0 or a sentinel where the other side gives a low probability"

    def __init__(self, context):
        super().__init__(context)
        self.count, self.total, self.by_side, self.positions, self.worst = 0, 0, {}, [], None

    def observe(self, step, tokens):
        hits = np.zeros(len(tokens), dtype=bool)
        for side, other in (("sampler_logprob", "trainer_logprob"), ("trainer_logprob", "sampler_logprob")):
            value, against = tokens[side].to_numpy(), tokens[other].to_numpy()
            fill = ((value == 0.0) | ~np.isfinite(value) | (value > 0) | (value <= SENTINEL_LOGPROB)) & (against < LOW_LOGPROB)
            fill &= np.isfinite(against) & (against > SENTINEL_LOGPROB)
            if fill.any():
                values = pd.Series(value[fill]).value_counts()
                self.by_side.setdefault(side, {}).update({float(v): self.by_side.get(side, {}).get(float(v), 0) + int(c)
                                                          for v, c in values.items()})
            hits |= fill
        self.total += len(tokens)
        if hits.any():
            self.count += int(hits.sum())
            self.positions += tokens["position"].to_numpy()[hits][:1000].tolist()
            gap = np.abs(tokens["sampler_logprob"].to_numpy() - tokens["trainer_logprob"].to_numpy())
            gap = np.where(hits & np.isfinite(gap), gap, -1.0)
            i = int(np.argmax(gap))
            if self.worst is None or gap[i] > self.worst[0]:
                self.worst = (float(gap[i]), _example(tokens.iloc[i]))
        return hits

    def finding(self):
        if self.count == 0:
            return None
        sides = "; ".join(f"{side}: " + ", ".join(f"{v:g} x{c}" for v, c in sorted(values.items(), key=lambda kv: -kv[1])[:3])
                          for side, values in self.by_side.items())
        positions = pd.Series(self.positions).value_counts()
        evidence = [f"{self.count} of {self.total} tokens ({self.count / self.total:.2%}) hold a fill value where the other side "
                    f"has logprob < {LOW_LOGPROB:.3g} (p < 0.5): {sides}",
                    f"at completion positions {', '.join(f'{p} (x{c})' for p, c in positions.head(5).items())}"]
        if self.worst is not None:
            w = self.worst[1]
            ratio = math.exp(min(abs(w["trainer_logprob"] - w["sampler_logprob"]), 700))
            evidence.append(f"worst: step {w['step']} request {w['request_id']} position {w['position']}: sampler "
                            f"{w['sampler_logprob']:.4g}, trainer {w['trainer_logprob']:.4g}: an importance ratio of {ratio:.3g} "
                            "(or its inverse) from one token")
        return Finding(self.name, self.title, self.count, evidence, self.worst[1] if self.worst else {})


class ShiftByOne(Diagnosis):
    """The sampler's logprob of token i is the trainer's of token i+1 (or i-1): the sides are one position apart."""

    name, title = "shift_by_one", "the sampler and trainer logprobs are shifted by one position against each other"

    def __init__(self, context):
        super().__init__(context)
        self.flagged = 0
        self.matched = {+1: 0, -1: 0}
        self.medians: dict[int, list[float]] = {0: [], +1: [], -1: []}

    def observe(self, step, tokens):
        sampler, trainer = tokens["sampler_logprob"].to_numpy(), tokens["trainer_logprob"].to_numpy()
        key = tokens["worker"].astype(str).to_numpy() + "/" + tokens["request_id"].to_numpy()
        same_next = np.append(key[1:] == key[:-1], False)
        same_prev = np.insert(key[1:] == key[:-1], 0, False)
        aligned = np.abs(sampler - trainer)
        ahead = np.full(len(tokens), np.inf)
        ahead[:-1] = np.abs(sampler[:-1] - trainer[1:])
        ahead[~same_next] = np.inf
        behind = np.full(len(tokens), np.inf)
        behind[1:] = np.abs(sampler[1:] - trainer[:-1])
        behind[~same_prev] = np.inf
        flagged = aligned > self.context.bar
        self.flagged += int(flagged.sum())
        explained = np.zeros(len(tokens), dtype=bool)
        for shift, shifted in ((+1, ahead), (-1, behind)):
            match = flagged & (shifted <= self.context.bar)
            self.matched[shift] += int(match.sum())
            explained |= match
            finite = shifted[np.isfinite(shifted)]
            if finite.size:
                self.medians[shift].append(float(np.median(finite)))
        self.medians[0].append(float(np.median(aligned)))
        return explained

    def finding(self):
        shift = max(self.matched, key=self.matched.get)
        matched = self.matched[shift]
        if self.flagged < MIN_TOKENS or matched < ONE_SIDED_SHARE * self.flagged:
            return None
        med = {k: float(np.median(v)) if v else float("nan") for k, v in self.medians.items()}
        word = "next" if shift > 0 else "previous"
        return Finding(self.name, self.title, matched, [
            f"{matched} of {self.flagged} flagged tokens agree within {self.context.bar:.3g} once the sampler's logprob of token i "
            f"is compared with the trainer's of the {word} token (i{shift:+d})",
            f"median |diff| aligned {med[0]:.3g}; shifted {shift:+d}: {med[shift]:.3g}; shifted {-shift:+d}: {med[-shift]:.3g}",
            "an off-by-one between prompt and response tokens (where the completion starts) in the export's logprob lists",
        ])


class TruncatedSampling(Diagnosis):
    """Sampler logprobs from a top-p/top-k-truncated, renormalized distribution scored against the full one."""

    name, title = "truncated_sampling", "truncated sampling (top-p / top-k) scored against the full distribution"

    def __init__(self, context):
        super().__init__(context)
        self.flagged = self.above = 0
        self.log_ratio_sum = 0.0
        self.ratio_sum, self.tokens = 0.0, 0

    def observe(self, step, tokens):
        sampler, trainer = tokens["sampler_logprob"].to_numpy(), tokens["trainer_logprob"].to_numpy()
        finite = np.isfinite(sampler) & np.isfinite(trainer) & (sampler <= 0)
        flagged = finite & (np.abs(sampler - trainer) > self.context.bar)
        # Renormalizing over a kept subset divides every kept probability by Z <= 1: the sampler's is never lower.
        above = flagged & (sampler > trainer)
        self.flagged += int(flagged.sum())
        self.above += int(above.sum())
        self.ratio_sum += float(np.exp(trainer[finite] - sampler[finite]).sum())
        self.tokens += int(finite.sum())
        return above

    def finding(self):
        if self.flagged < MIN_TOKENS or self.above < ONE_SIDED_SHARE * self.flagged:
            return None
        evidence = [f"{self.above} of {self.flagged} flagged tokens have sampler logprob > trainer logprob: one-sided, as a "
                    "renormalized truncated distribution gives (an engine fault moves both ways)",
                    f"mean importance ratio exp(trainer - sampler) {self.ratio_sum / max(self.tokens, 1):.3g} over {self.tokens} tokens "
                    "(1 when both sides score the same distribution)"]
        try:
            requests = read_requests(self.context.run_dir)
            truncated = [r for r in requests if r.top_p < 1.0 or r.top_k > 0]
            evidence.append(f"{len(truncated)} of {len(requests)} recorded requests ask for top_p < 1 or top_k > 0"
                            + (f" (top_p {sorted({r.top_p for r in truncated})}, top_k {sorted({r.top_k for r in truncated})})" if truncated
                               else "; the export may not record its sampling params"))
        except RecordsError:
            pass
        evidence.append("score the trainer side with the same top-p/top-k mask, or sample with processed logprobs off "
                        "(vLLM logprobs_mode=raw_logprobs) and correct for the truncation")
        return Finding(self.name, self.title, self.above, evidence)


class StaleWeights(Diagnosis):
    """The sampler ran an older policy than the trainer scored with: from recorded weight versions, or a
    clean first step followed by steps where nearly every request disagrees."""

    name, title = "stale_weights", "the sampler's weights lag the trainer's (an older policy sampled the step)"

    def __init__(self, context):
        super().__init__(context)
        self.lagging = {"requests": 0, "tokens": 0, "flagged": 0, "diff_sum": 0.0}
        self.current = {"requests": 0, "tokens": 0, "flagged": 0, "diff_sum": 0.0}
        self.steps: list[tuple[int, float, int, int]] = []  # step, share of requests flagged, flagged tokens, requests
        self.has_versions = False
        extra = Path(context.run_dir) / "extra"
        self.extra_dir = extra if extra.is_dir() else None

    def _versions(self, step: int) -> Optional[pd.DataFrame]:
        if self.extra_dir is None or not (self.extra_dir / f"step_{step:05d}.parquet").exists():
            return None
        return pq.read_table(self.extra_dir / f"step_{step:05d}.parquet").to_pandas()

    def observe(self, step, tokens):
        diff = tokens["abs_diff"].to_numpy()
        flagged = diff > self.context.bar
        request = tokens["worker"].astype(str).to_numpy() + "/" + tokens["request_id"].to_numpy()
        per_request = pd.Series(flagged).groupby(request).any()
        self.steps.append((step, float(per_request.mean()), int(flagged.sum()), len(per_request)))
        versions = self._versions(step)
        if versions is None or versions["weight_version"].isna().all():
            return np.zeros(len(tokens), dtype=bool)
        self.has_versions = True
        version = dict(zip(versions["worker"].astype(str) + "/" + versions["request_id"], versions["weight_version"]))
        lag = np.array([version.get(r, step) is not None and version.get(r, step) < step for r in request])
        for group, mask in ((self.lagging, lag), (self.current, ~lag)):
            group["requests"] += len(set(request[mask]))
            group["tokens"] += int(mask.sum())
            group["flagged"] += int((flagged & mask).sum())
            group["diff_sum"] += float(diff[mask].sum())
        return flagged & lag

    def finding(self):
        bar = self.context.bar
        if self.has_versions:
            lag, cur = self.lagging, self.current
            if lag["flagged"] == 0:
                return None
            mean = lambda g: g["diff_sum"] / max(g["tokens"], 1)  # noqa: E731
            if cur["tokens"] and mean(lag) <= 2 * mean(cur):
                return None
            return Finding(self.name, self.title, lag["flagged"], [
                f"{lag['requests']} requests were sampled with a weight_version older than their step; {lag['flagged']} of their "
                f"{lag['tokens']} tokens are flagged (> {bar:.3g}), mean |diff| {mean(lag):.3g}",
                f"the {cur['requests']} requests on current weights: {cur['flagged']} of {cur['tokens']} tokens flagged, "
                f"mean |diff| {mean(cur):.3g}",
                "the weight sync to the sampler lagged (or async off-policy sampling beyond its bound): compare the sync's version "
                "with the trainer's step",
            ])
        if len(self.steps) < 2:
            return None
        first, later = self.steps[0], self.steps[1:]
        if first[2] > 0 or not all(share >= BROAD_SHARE for _, share, _, _ in later):
            return None
        return Finding(self.name, self.title + " (suspected: the export records no weight versions)", sum(s[2] for s in later), [
            f"step {first[0]} (the checkpoint both sides start from) flags no token above {bar:.3g}",
            "every later step flags most of its requests: " + ", ".join(f"step {s}: {share:.0%} of {n}" for s, share, _, n in later),
            "a broad, step-wise mismatch after a clean first step is what a sampler a sync behind gives; an engine fault "
            "strikes some requests (preempted, cached, batched), not all",
        ])


class TrainerVariance(Diagnosis):
    """Flagged tokens whose |difference| the trainer reaches against itself (batching alone)."""

    name, title = "trainer_variance", "the trainer's own batch/chunk variance"

    def __init__(self, context):
        super().__init__(context)
        self.flagged = self.within = 0

    def observe(self, step, tokens):
        if self.context.floor is None:
            return np.zeros(len(tokens), dtype=bool)
        diff = tokens["abs_diff"].to_numpy()
        flagged = diff > self.context.threshold
        within = flagged & (diff <= self.context.floor.abs_diff_max)
        self.flagged += int(flagged.sum())
        self.within += int(within.sum())
        return within

    def finding(self):
        if self.within == 0:
            return None
        floor = self.context.floor
        return Finding(self.name, self.title, self.within, [
            f"{self.within} of {self.flagged} tokens above the spike threshold {self.context.threshold:.3g} lie within "
            f"{floor.describe()}",
            "the threshold is below what the trainer varies by itself: raise it (--spike-threshold) or make the trainer "
            "batch-invariant before blaming the engine",
        ])


# The registry: adding a diagnosis is a class and a line.
DIAGNOSES: list[type[Diagnosis]] = [FillValue, ShiftByOne, TruncatedSampling, StaleWeights, TrainerVariance]
