"""The scheduler hook rollout_lab installs inside vLLM (`scheduler_cls`; no edited vLLM).

`RecordingScheduler` is vLLM's scheduler plus one JSON line per step, written to
$ROLLOUT_LAB_SCHED_LOG (instrument.py reads and joins them). The other ways in are the worker
extension (weight_sync.py) and `LLM.collective_rpc(faults.install, ...)` (faults.py).
"""
from __future__ import annotations

import os

from rollout_lab import compat
from rollout_lab.instrument import SCHEDULE_LOG_ENV, CacheGroup, ScheduledRequest, SchedulerStep, header_line, step_line


class RecordingScheduler(compat.scheduler_base()):
    """vLLM's scheduler, unchanged, plus one JSON line per step describing what it decided."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        path = os.environ.get(SCHEDULE_LOG_ENV)
        self._log = open(path, "a", buffering=1) if path else None
        self._step = 0
        if self._log is not None:
            groups = [CacheGroup(type(g.kv_cache_spec).__name__, g.kv_cache_spec.block_size)
                      for g in self.kv_cache_config.kv_cache_groups]
            self._log.write(header_line(groups, self.kv_cache_config.num_blocks))

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        if self._log is not None:
            requests = {}
            for req_id, num_tokens in output.num_scheduled_tokens.items():
                # schedule() has already advanced num_computed_tokens past this step's chunk.
                computed = self.requests[req_id].num_computed_tokens - num_tokens
                blocks = self.kv_cache_manager.get_block_ids(req_id)
                requests[req_id] = ScheduledRequest(computed, num_tokens, [list(b) for b in blocks])
            self._log.write(step_line(SchedulerStep(self._step, requests, sorted(output.preempted_req_ids or ()))))
        self._step += 1
        return output

