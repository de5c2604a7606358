"""Workload generators: the request traces a hunt trial drives through one engine.

A generator turns (rng, token pool, engine limits, max_tokens) into a list of TraceRequest: a
prompt as token ids, the engine step at which it is added, and optionally the number of engine
steps after which it is aborted mid-flight. Traces where every request arrives at step 0 and none
is aborted run as one `LLM.generate` call; the others are driven step by step through
`LLMEngine.add_request / step / abort_request`, since state-reuse bugs live in those orderings.

To add one: write `def name(rng, pool, limits, max_tokens) -> list[TraceRequest]` below, add it
to GENERATORS, and list it in conf/hunt/default.yaml.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional


@dataclass
class TraceRequest:
    prompt_token_ids: list[int]
    arrive_step: int = 0
    # Abort this many engine steps after it was added (None: runs to completion).
    abort_after: Optional[int] = None


@dataclass
class Limits:
    """What the engine accepts, read from its config once it started."""

    max_model_len: int
    max_num_batched_tokens: int
    block_size: int
    # KV blocks the engine allocated (0: unknown).
    num_blocks: int = 0

    def prompt_cap(self, max_tokens: int) -> int:
        """The longest prompt that leaves room for max_tokens."""
        return max(self.max_model_len - max_tokens, 1)


def _prompt(rng: random.Random, pool: list[int], length: int) -> list[int]:
    """`length` consecutive tokens of the pool (wrapping), from a random offset."""
    start = rng.randrange(len(pool))
    return [pool[(start + i) % len(pool)] for i in range(max(length, 1))]


def _loguniform(rng: random.Random, low: int, high: int) -> int:
    low, high = max(low, 1), max(high, 1)
    if high <= low:
        return high
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def many_short(rng, pool, limits: Limits, max_tokens: int) -> list[TraceRequest]:
    cap = limits.prompt_cap(max_tokens)
    return [TraceRequest(_prompt(rng, pool, rng.randint(1, min(24, cap)))) for _ in range(rng.randint(8, 24))]


def mixed_lengths(rng, pool, limits: Limits, max_tokens: int) -> list[TraceRequest]:
    cap = limits.prompt_cap(max_tokens)
    return [TraceRequest(_prompt(rng, pool, _loguniform(rng, 2, cap))) for _ in range(rng.randint(4, 12))]


def shared_prefix(rng, pool, limits: Limits, max_tokens: int) -> list[TraceRequest]:
    """A family of prompts sharing a prefix of one or more blocks: prefix-cache hits while they run."""
    cap = limits.prompt_cap(max_tokens)
    prefix = _prompt(rng, pool, min(_loguniform(rng, limits.block_size, cap), max(cap - 1, 1)))
    room = max(cap - len(prefix), 1)
    return [TraceRequest(prefix + _prompt(rng, pool, rng.randint(1, min(16, room)))[: cap]) for _ in range(rng.randint(3, 8))]


def repeated(rng, pool, limits: Limits, max_tokens: int) -> list[TraceRequest]:
    """One prompt several times, arriving a few steps apart, so later copies hit the prefix cache."""
    prompt = _prompt(rng, pool, _loguniform(rng, 8, limits.prompt_cap(max_tokens)))
    gap = rng.randint(0, 4)
    return [TraceRequest(list(prompt), arrive_step=i * gap) for i in range(rng.randint(2, 6))]


def long_prompt(rng, pool, limits: Limits, max_tokens: int) -> list[TraceRequest]:
    """Prompts longer than the per-step token budget (chunked prefill), when the model length allows."""
    cap = limits.prompt_cap(max_tokens)
    low = min(limits.max_num_batched_tokens + 1, cap)
    return [TraceRequest(_prompt(rng, pool, rng.randint(low, cap))) for _ in range(rng.randint(1, 3))]


def preemption_load(rng, pool, limits: Limits, max_tokens: int) -> list[TraceRequest]:
    """More tokens at once than the KV cache holds (1.5-3x its blocks): the engine must preempt."""
    cap = limits.prompt_cap(max_tokens)
    lengths = [rng.randint(max(cap // 4, 1), max(cap // 2, 1)) for _ in range(64)]
    if limits.num_blocks:
        want = rng.uniform(1.5, 3.0) * limits.num_blocks * limits.block_size
        count, total = 0, 0
        while count < len(lengths) and total < want:
            total += lengths[count] + max_tokens
            count += 1
        count = max(count, 8)
    else:
        count = rng.randint(8, 24)
    return [TraceRequest(_prompt(rng, pool, n)) for n in lengths[:count]]


def timed_trace(rng, pool, limits: Limits, max_tokens: int) -> list[TraceRequest]:
    """Requests added at chosen engine steps, about a third aborted mid-flight."""
    cap = limits.prompt_cap(max_tokens)
    trace = []
    for _ in range(rng.randint(4, 12)):
        abort = rng.randint(1, 10) if rng.random() < 0.3 else None
        trace.append(TraceRequest(_prompt(rng, pool, _loguniform(rng, 2, cap)), arrive_step=rng.randint(0, 20), abort_after=abort))
    return trace


GENERATORS = {
    g.__name__: g
    for g in (many_short, mixed_lengths, shared_prefix, repeated, long_prompt, preemption_load, timed_trace)
}


def token_pool(tokenizer) -> list[int]:
    """Real text as token ids: the shipped arithmetic problems, end to end."""
    from rollout_lab.workload import make_problems

    text = " ".join(p.question for p in make_problems(400, seed=1234))
    return list(tokenizer(text)["input_ids"])


def make_trace(name: str, seed: int, pool: list[int], limits: Limits, max_tokens: int) -> list[TraceRequest]:
    """The trace of generator `name` for this seed: the same on every run."""
    return GENERATORS[name](random.Random(seed), pool, limits, max_tokens)


def is_batch(trace: list[TraceRequest]) -> bool:
    """Whether the trace is one batch (all at step 0, nothing aborted)."""
    return all(r.arrive_step == 0 and r.abort_after is None for r in trace)
