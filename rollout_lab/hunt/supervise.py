"""Supervision: one group on Ray in its own process, watched through its lines file.

The driver hands a Group here; it is validated (vLLM's config check, no engine), run as a Ray
task (runner.run_group, max_calls=1: the process and the engine's memory end with the group) and
its events (protocol.TrialEvent) read as they come. Each trial result goes to the driver's
`record`. The hang watchdog: no engine step, no reference batch, no event for
`hunt.oracles.trial_timeout_s` (`engine_start_timeout_s` before the engine is up) is a hang, and
the process is killed. A process that ends with a trial unfinished died.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from rollout_lab.hunt.protocol import (EngineStarted, Heartbeat, OutOfTime, TrialFinished, TrialResult, TrialStarted,
                                       read_events)
from rollout_lab.hunt.search import Group
from rollout_lab.hunt.space import HuntRunConfig
from rollout_lab.hunt.store import Store
from rollout_lab.oracles import trial_oracles

# record(group index, engine point, trial key, workload point, result)
Record = Callable[[int, dict, str, dict, TrialResult], None]


def lines_path(hunt_dir: Path, index: int) -> Path:
    return hunt_dir / "lines" / f"group_{index:04d}.jsonl"


class Supervisor:
    def __init__(self, cfg: HuntRunConfig, hunt_dir: Path, store: Store, fault_params: dict, console):
        self.cfg, self.dir, self.store, self.console = cfg, hunt_dir, store, console
        self.fault, self.fault_params = cfg.fault.name, fault_params
        (hunt_dir / "lines").mkdir(parents=True, exist_ok=True)

    def recover(self, done: set[str], record: Record) -> None:
        """Groups a killed hunt left running: record the results their lines hold, mark them killed."""
        for g in self.store.groups():
            if g.status != "running":
                continue
            for event in read_events(lines_path(self.dir, g.idx), 0)[0]:
                if isinstance(event, TrialFinished) and event.trial not in done:
                    record(g.idx, g.engine, event.trial, event.point, event.result)
            self.store.end_group(g.idx, "killed", "the hunt was stopped while this group ran")

    def run(self, group: Group, done: set[str], deadline: float, record: Record) -> str:
        """Run one group to its end; its status (ok, rejected, crash, hang, died, skipped, out_of_time).
        No trial of it starts after `deadline` (time.time())."""
        import ray

        from rollout_lab import engine
        from rollout_lab.hunt.runner import GroupSpec, run_group
        from rollout_lab.hunt.space import engine_args
        from rollout_lab.models import resolve_model

        workloads = [w for w in group.workloads if group.trial_key(w) not in done]
        self.store.add_group(group.index, group.key, group.engine, group.reason, time.time(), group.workloads)
        if not workloads:
            self.store.end_group(group.index, "skipped", "every workload already tried")
            return "skipped"
        complaint = engine.validate(resolve_model(group.engine["model"]), engine_args(group.engine))
        if complaint is not None:
            self.store.end_group(group.index, "rejected", complaint)
            self.console.print(f"[bold]group {group.index}[/] [yellow]rejected[/] by vLLM's config validation: {complaint}",
                               highlight=False)
            return "rejected"
        o, hunt = self.cfg.hunt.oracles, self.cfg.hunt
        cores = os.cpu_count() or 1
        spec = GroupSpec(group.key, group.engine, resolve_model(group.engine["model"]),
                         [(group.trial_key(w), w) for w in workloads], deadline, self.fault, self.fault_params,
                         o, threads=max(cores // hunt.parallel, 1))
        path = lines_path(self.dir, group.index)
        path.unlink(missing_ok=True)
        # max_calls=1: the process exits after its group, and the engine's memory with it.
        # On a GPU node each engine in flight takes an equal share of the node's GPUs, and a
        # tensor-parallel one a whole GPU per rank (Ray's CUDA_VISIBLE_DEVICES is what its ranks see).
        gpus = ray.cluster_resources().get("GPU", 0) / hunt.parallel
        tp = int(engine_args(group.engine).get("tensor_parallel_size") or 1)
        task = ray.remote(max_calls=1, max_retries=0)(run_group).options(
            num_cpus=max(cores // hunt.parallel, 1), num_gpus=tp if tp > 1 else min(gpus, 1.0))
        ref = task.remote(spec, str(path.resolve()))  # the task's process may start in another directory
        by_key = dict(spec.trials)
        self.console.print(
            f"[bold]group {group.index}[/] ({group.reason}) {group.engine.get('model')} "
            f"{json.dumps({k.removeprefix('engine.'): v for k, v in group.engine.items() if k != 'model'})}: "
            f"{len(workloads)} workloads", highlight=False)
        offset, current, last_progress, engine_up, status, message = 0, None, time.time(), False, "ok", ""
        steps = -1
        start_key = f"{group.key}-start"
        while True:
            finished = bool(ray.wait([ref], timeout=1.0)[0])
            events, offset = read_events(path, offset)
            for event in events:
                if isinstance(event, Heartbeat):
                    # Progress only when the engine took a step since the last beat.
                    if event.steps > steps:
                        steps, last_progress = event.steps, time.time()
                    continue
                last_progress = time.time()
                if isinstance(event, EngineStarted):
                    engine_up = event.status == "ok"
                    self.store.end_group(group.index, "running", "", event.seconds)
                    if not engine_up:
                        status, message = event.status, event.message or event.crash.message
                        if status == "crash":
                            record(group.index, group.engine, start_key, {},
                                   TrialResult("crash", crash=event.crash, phase="engine_start"))
                elif isinstance(event, TrialStarted):
                    current = event.trial
                elif isinstance(event, TrialFinished):
                    current = None
                    record(group.index, group.engine, event.trial, event.point, event.result)
                    self.report_trial(event)
                    if event.result.status == "crash":
                        status = "crash"
                elif isinstance(event, OutOfTime):
                    status, message = "out_of_time", f"the hunt's budget ran out before trial {event.next_trial}"
            if finished:
                break
            limit = o.trial_timeout_s if engine_up else o.engine_start_timeout_s
            if time.time() - last_progress > limit:
                phase = "trial" if engine_up else "engine_start"
                ray.cancel(ref, force=True)
                record(group.index, group.engine, current or start_key, by_key.get(current, {}),
                       TrialResult("hang", seconds=time.time() - last_progress, phase=phase))
                status, message = "hang", f"no progress for {limit:.0f} s ({phase})"
                break
        if status == "ok" and (not engine_up or current is not None):
            # The process ended with a trial (or the engine start) unfinished: it died.
            status, message = "died", "the engine process ended without a word (killed? out of memory?)"
            try:
                ray.get(ref)
            except Exception as exc:  # the task's own failure is the message
                message = " ".join(str(getattr(exc, "cause", None) or exc).split())[:300]
            record(group.index, group.engine, current or start_key, by_key.get(current, {}),
                   TrialResult("died", phase="trial" if engine_up else "engine_start", message=message))
        self.store.end_group(group.index, status, message)
        if status == "rejected":
            self.console.print(f"  [yellow]rejected[/]: {message}", highlight=False)
        return status

    def report_trial(self, event: TrialFinished) -> None:
        result = event.result
        if result.status == "rejected":
            self.console.print(f"  trial {event.trial}: [yellow]rejected[/] {result.message}", highlight=False)
            return
        if result.status == "crash":
            self.console.print(f"  trial {event.trial}: [red]crash[/] {result.crash.key}", highlight=False)
            return
        said = [o.console(result.oracles[o.name]) for o in trial_oracles() if o.name in result.oracles]
        colour = "red" if result.status == "fail" else "green"
        self.console.print(
            f"  trial {event.trial}: [{colour}]{result.status}[/] {result.num_requests} requests, "
            f"{result.num_tokens} tokens, {result.preempted_requests} preempted, {result.cached_requests} cached; "
            f"{' '.join(s for s in said if s)} ({result.seconds:.1f} s)", highlight=False)
