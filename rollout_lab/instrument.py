"""Request-level scheduling records, read back and joined onto the per-token table.

`engine_hooks.RecordingScheduler` writes one JSON line per scheduler step inside vLLM: for each
scheduled request, the tokens it had computed before the step, how many it computes now, and its
block ids per KV cache group (for hybrid models the Mamba group's block is the request's SSM
state slot); and which requests were preempted. The first line describes the KV cache groups.

`join_schedule` turns those lines into per-token facts: the token at completion position j was
sampled in the first step whose chunk ended at prompt_len + j (re-prefills after a preemption
recompute it, they do not resample it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# Where engine_hooks.RecordingScheduler writes, inside the engine (same process or a child).
SCHEDULE_LOG_ENV = "ROLLOUT_LAB_SCHED_LOG"


@dataclass
class ScheduleLog:
    """Parsed scheduler lines of one engine: cache groups and the steps, in order."""

    groups: list[dict] = field(default_factory=list)
    num_blocks: int = 0
    steps: list[dict] = field(default_factory=list)


class ScheduleReader:
    """Reads a growing schedule log; each call returns the steps written since the last one."""

    def __init__(self, path: Path):
        self.path, self.offset = Path(path), 0
        self.groups: list[dict] = []
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
                        self.groups, self.num_blocks = record["groups"], record["num_blocks"]
                    else:
                        log.steps.append(record)
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


def join_schedule(log: ScheduleLog) -> dict[str, dict[int, tuple[int, list, int]]]:
    """Map output request id -> {end position -> (engine step, block ids per group, preemptions so far)}."""
    ends: dict[str, dict[int, tuple[int, list, int]]] = {}
    preemptions: dict[str, int] = {}
    for step in log.steps:
        for internal_id, (start, num_tokens, blocks) in step["requests"].items():
            rid = engine_request_id(internal_id)
            end = start + num_tokens
            ends.setdefault(rid, {}).setdefault(end, (step["step"], blocks, preemptions.get(rid, 0)))
        for internal_id in step["preempted"]:
            rid = engine_request_id(internal_id)
            preemptions[rid] = preemptions.get(rid, 0) + 1
    return ends


def token_facts(
    log: ScheduleLog, ends: dict[str, dict[int, tuple[int, list, int]]], request_id: str, prompt_len: int, num_tokens: int
) -> TokenFacts:
    """Per completion token: the KV block holding its input position, the SSM state slot, preemptions before it."""
    attention = [i for i, g in enumerate(log.groups) if "Mamba" not in g["kind"]]
    mamba = [i for i, g in enumerate(log.groups) if "Mamba" in g["kind"]]
    facts = TokenFacts([], [], [])
    request_ends = ends.get(request_id, {})
    for j in range(num_tokens):
        entry = request_ends.get(prompt_len + j)
        if entry is None:
            facts.kv_blocks.append(None), facts.state_slots.append(None), facts.preemptions_before.append(0)
            continue
        _, blocks, preempted = entry
        input_position = prompt_len + j - 1
        kv_block = None
        if attention:
            group = attention[0]
            index = input_position // log.groups[group]["block_size"]
            kv_block = blocks[group][index] if index < len(blocks[group]) else None
        state_slot = blocks[mamba[0]][-1] if mamba and blocks[mamba[0]] else None
        facts.kv_blocks.append(kv_block)
        facts.state_slots.append(state_slot)
        facts.preemptions_before.append(preempted)
    return facts
