"""Request-level scheduling records, read back and joined onto the per-token table.

`engine_hooks.RecordingScheduler` writes one JSON line per scheduler step inside vLLM (step_line, a
SchedulerStep): for each scheduled request, the tokens it had computed before the step, how many it
computes now, and its block ids per KV cache group (for hybrid models the Mamba group's block is
the request's SSM state slot); and which requests were preempted. The first line (header_line)
describes the KV cache groups. ScheduleReader parses them back; nothing else reads the lines.

`join_schedule` turns those lines into per-token facts: the token at completion position j was
sampled in the first step whose chunk ended at prompt_len + j (re-prefills after a preemption
recompute it, they do not resample it).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

# Where engine_hooks.RecordingScheduler writes, inside the engine (same process or a child).
SCHEDULE_LOG_ENV = "ROLLOUT_LAB_SCHED_LOG"


@dataclass
class CacheGroup:
    """One KV cache group of the engine: vLLM's spec class (FullAttentionSpec, MambaSpec, ...), tokens per block."""

    kind: str
    block_size: int

    @property
    def is_mamba(self) -> bool:
        """A Mamba group: a request's block is its SSM state slot."""
        return "Mamba" in self.kind


@dataclass
class ScheduledRequest:
    """What one step scheduled for one request."""

    computed: int  # tokens it had computed before the step
    num_tokens: int  # tokens it computes in the step
    blocks: list[list[int]]  # its block ids per KV cache group, after the step's allocation


@dataclass
class SchedulerStep:
    """One scheduler step: the requests it scheduled (by vLLM's internal id) and those it preempted."""

    step: int
    requests: dict[str, ScheduledRequest]
    preempted: list[str]


@dataclass
class ScheduleLog:
    """Parsed scheduler lines of one engine: cache groups and the steps, in order."""

    groups: list[CacheGroup] = field(default_factory=list)
    num_blocks: int = 0
    steps: list[SchedulerStep] = field(default_factory=list)


# The lines on disk, written inside vLLM every step: compact, each request [computed, num_tokens, blocks].
def header_line(groups: list[CacheGroup], num_blocks: int) -> str:
    """The log's first line: the engine's KV cache groups and its block count."""
    return json.dumps({"groups": [asdict(g) for g in groups], "num_blocks": num_blocks}) + "\n"


def step_line(step: SchedulerStep) -> str:
    """One step's line."""
    requests = {rid: [r.computed, r.num_tokens, r.blocks] for rid, r in step.requests.items()}
    return json.dumps({"step": step.step, "requests": requests, "preempted": step.preempted}) + "\n"


def parse_step(record: dict) -> SchedulerStep:
    """A step line (as parsed JSON) as a SchedulerStep."""
    return SchedulerStep(record["step"], {rid: ScheduledRequest(computed, num_tokens, blocks)
                                          for rid, (computed, num_tokens, blocks) in record["requests"].items()},
                         list(record["preempted"]))


class ScheduleReader:
    """Reads a growing schedule log; each call returns the steps written since the last one."""

    def __init__(self, path: Path):
        self.path, self.offset = Path(path), 0
        self.groups: list[CacheGroup] = []
        self.num_blocks = 0

    def read_new(self) -> ScheduleLog:
        log = ScheduleLog()
        if self.path.exists():
            with self.path.open() as f:
                f.seek(self.offset)
                for line in f:
                    if not line.endswith("\n"):
                        break  # a line still being written
                    self.offset += len(line.encode())
                    record = json.loads(line)
                    if "groups" in record:
                        self.groups, self.num_blocks = [CacheGroup(**g) for g in record["groups"]], record["num_blocks"]
                    else:
                        log.steps.append(parse_step(record))
        log.groups, log.num_blocks = self.groups, self.num_blocks
        return log


def engine_request_id(internal_id: str) -> str:
    """vLLM's internal request id is '<output id>-<random suffix>'; the output id is what LLM returns."""
    return internal_id.rsplit("-", 1)[0]


@dataclass
class TokenFacts:
    """Where each completion token of one request was computed."""

    kv_blocks: list[Optional[int]]
    state_slots: list[Optional[int]]
    preemptions_before: list[int]


@dataclass
class ChunkEnd:
    """The step whose chunk of a request ended at a given position: there the token at it was sampled."""

    step: int
    blocks: list[list[int]]  # the request's block ids per KV cache group in that step
    preemptions_before: int  # the request's preemptions before that step


def join_schedule(log: ScheduleLog) -> dict[str, dict[int, ChunkEnd]]:
    """Map output request id -> {end position -> the first step whose chunk ended there}."""
    ends: dict[str, dict[int, ChunkEnd]] = {}
    preemptions: dict[str, int] = {}
    for step in log.steps:
        for internal_id, scheduled in step.requests.items():
            rid = engine_request_id(internal_id)
            end = scheduled.computed + scheduled.num_tokens
            ends.setdefault(rid, {}).setdefault(end, ChunkEnd(step.step, scheduled.blocks, preemptions.get(rid, 0)))
        for internal_id in step.preempted:
            rid = engine_request_id(internal_id)
            preemptions[rid] = preemptions.get(rid, 0) + 1
    return ends


def token_facts(log: ScheduleLog, ends: dict[str, dict[int, ChunkEnd]], request_id: str, prompt_len: int,
                num_tokens: int) -> TokenFacts:
    """Per completion token: the KV block holding its input position, the SSM state slot, preemptions before it."""
    attention = [i for i, g in enumerate(log.groups) if not g.is_mamba]
    mamba = [i for i, g in enumerate(log.groups) if g.is_mamba]
    facts = TokenFacts([], [], [])
    request_ends = ends.get(request_id, {})
    for j in range(num_tokens):
        entry = request_ends.get(prompt_len + j)
        if entry is None:
            facts.kv_blocks.append(None), facts.state_slots.append(None), facts.preemptions_before.append(0)
            continue
        blocks = entry.blocks
        input_position = prompt_len + j - 1
        kv_block = None
        if attention:
            group = attention[0]
            index = input_position // log.groups[group].block_size
            kv_block = blocks[group][index] if index < len(blocks[group]) else None
        state_slot = blocks[mamba[0]][-1] if mamba and blocks[mamba[0]] else None
        facts.kv_blocks.append(kv_block)
        facts.state_slots.append(state_slot)
        facts.preemptions_before.append(entry.preemptions_before)
    return facts


def peak_block_fraction(log: ScheduleLog) -> float:
    """The largest share of the engine's blocks that the requests of one step held."""
    return max(len({b for r in step.requests.values() for group in r.blocks for b in group}) for step in log.steps) / log.num_blocks
