"""The hunt's driver: plan a group, run it (supervise.py), record and triage each trial, minimize
new findings (repros.py), report; the clock and the budget across resumes.

The budget (hunt.budget_s, hunt seconds summed over every session on the dir) is a hard limit on
starting work: no group, trial or minimization starts once it is spent; what is in flight finishes.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

from rollout_lab.hunt.constraints import Learned
from rollout_lab.hunt.protocol import Finding, Signature, TrialResult, read_known_bugs
from rollout_lab.hunt.space import HuntRunConfig, with_pressure
from rollout_lab.hunt.store import GroupRow, TrialRow
from rollout_lab.hunt.triage import behaviours, is_harness_error

REPO = Path(__file__).resolve().parents[2]


def stop_on_signals() -> None:
    """Ctrl-C, `kill -INT` and a scheduler's SIGTERM all stop the hunt as Ctrl-C does: the report is
    written and the dir resumes. (A shell starts a background job with SIGINT ignored; this undoes it.)"""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def rest_after_crash(group, status: str, done: set[str]):
    """The group's untried workloads on a fresh engine of the same configuration, after a crash in
    one of its trials (a crashed engine is in no known state). None when there are none, when
    the engine itself failed to start (it would again), or when the crash came on the group's
    first trial: an engine that crashes on whatever it is given first costs a start per trial."""
    from rollout_lab.hunt.search import Group

    if status != "crash" or f"{group.key}-start" in done:
        return None
    ran = sum(group.trial_key(w) in done for w in group.workloads)
    left = [w for w in group.workloads if group.trial_key(w) not in done]
    return Group(group.index, group.engine, left, "rest after a crash") if left and ran >= 2 else None


def rest_after_stop(groups: list[GroupRow], done: set[str]):
    """The untried workloads of the group the budget stopped in the last session (no trial was in
    flight), to run first when the hunt resumes with more budget; None when there are none."""
    from rollout_lab.hunt.search import Group

    if not groups or groups[-1].status != "out_of_time":
        return None
    last = groups[-1]
    group = Group(last.idx, last.engine, [], "rest after the budget ran out")
    group.workloads = [w for w in last.workloads if group.trial_key(w) not in done]
    return group if group.workloads else None


class Hunt:
    """The driver: plans groups, runs them on Ray, records, dedups, minimizes, reports."""

    def __init__(self, cfg: HuntRunConfig, hunt_dir: Path):
        from rich.console import Console

        from rollout_lab.config import fault_params
        from rollout_lab.hunt.repros import Repros
        from rollout_lab.hunt.trace import valid_workload
        from rollout_lab.hunt.search import Coverage, Planner
        from rollout_lab.hunt.space import Space
        from rollout_lab.hunt.store import Store
        from rollout_lab.hunt.supervise import Supervisor

        self.cfg, self.dir = cfg, hunt_dir
        self.console = Console(soft_wrap=True)
        self.space = Space.from_config(cfg.hunt.space)
        self.fault = cfg.fault.name
        params = fault_params(cfg.fault.name, dict(cfg.fault.params)) if cfg.fault.name else {}
        hunt_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(hunt_dir / "hunt.db")
        previous = self.store.meta("config")
        if previous is not None and previous.get("fault") != self.fault:
            raise ValueError(f"hunt dir {hunt_dir} was hunted with fault={previous.get('fault')}; "
                             f"resume it with the same fault or pick a new dir")
        self.store.set_meta("config", {"fault": self.fault, "hunt": OmegaConf.to_container(OmegaConf.structured(cfg.hunt))})
        self.supervisor = Supervisor(cfg, hunt_dir, self.store, params, self.console)
        self.repros = Repros(cfg, hunt_dir, self.store, params, self.console)
        # Bugs already reduced to a repro in the repo: found again, they are marked known and
        # neither minimized nor explored around (a fuzzer's corpus of known crashes). Their repro
        # is named as hunt.known_repros names the folder (relative to the repo): no machine's path.
        folder = cfg.hunt.known_repros
        self.known = {sig: str(Path(folder) / path.parent.name / path.name)
                      for sig, path in read_known_bugs(REPO / folder if folder else None).items()}
        self.planner = Planner(self.space, cfg.hunt.seed, cfg.hunt.candidates, cfg.hunt.exploit, valid_workload)
        self.coverage = Coverage(self.space.dims())
        # (engine, workload, signature) of failing trials.
        self.failing: list[tuple[dict, dict, Signature]] = []
        # Engine behaviours seen (the fuzzer's edges) and trials that showed a rare one.
        self.behaviours: Counter = Counter()
        self.interesting: list[tuple[dict, dict]] = []
        self.done = self.store.trial_keys()
        self.elapsed_before = float(self.store.meta("elapsed_s", 0.0))
        self.session_start = time.time()
        self.timeline: list[tuple[float, int, int, float, float]] = self.store.meta("timeline", [])
        for trial in self.store.trials():
            if trial.status != "rejected":
                self.coverage.record(trial.engine | trial.workload)
            if trial.status in ("fail", "crash") and trial.workload:
                self.failing.append((trial.engine, trial.workload, trial.signature))
            self.note_behaviours(trial.engine, trial.workload, trial.result)
        self.supervisor.recover(self.done, self.record_trial)
        groups = self.store.groups()
        self.rejected = {g.key for g in groups if g.status == "rejected"}
        # Constraints between knobs learned from vLLM's refusals (the store keeps each one's message).
        self.learned = Learned.from_groups(groups)
        self.resumed = bool(self.done) or bool(groups)
        # The first group of this session: the rest of one the budget stopped, or the planner's.
        self.pending = rest_after_stop(groups, self.done)

    # the clock, across resumes
    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.session_start

    def save_clock(self) -> None:
        self.store.set_meta("elapsed_s", self.elapsed())
        self.store.set_meta("timeline", self.timeline)

    def budget_left(self) -> float:
        return self.cfg.hunt.budget_s - self.elapsed()

    # recording
    def record_trial(self, group_idx: int, engine: dict, trial_key: str, workload: dict, result: TrialResult) -> None:
        if is_harness_error(result):
            result.status = "harness_error"
            self.console.print(f"[bold red]harness error[/] (a rollout_lab bug, not a finding): "
                               f"{result.crash.exception_type}: {result.crash.message}", highlight=False)
        signature = result.signature(engine)
        elapsed = self.elapsed()
        self.store.add_trial(TrialRow(trial_key, group_idx, engine, workload, result.status, signature, result,
                                      result.seconds, elapsed))
        self.done.add(trial_key)
        self.store.set_meta("elapsed_s", elapsed)
        if result.status != "rejected":  # refused by vLLM's validation: nothing was exercised
            self.coverage.record(engine | workload)
            self.note_behaviours(engine, workload, result)
        if signature is None:
            return
        if workload:
            self.failing.append((engine, workload, signature))
        finding = self.store.finding(signature)
        if finding is None:
            finding = Finding(signature, trial_key, elapsed, self.store.count_trials(), 0, engine, workload, result)
            if signature in self.known:
                finding.state, finding.repro = "known", self.known[signature]
                self.console.print(f"[yellow]known bug[/] {signature} ({finding.repro}; not minimized again)")
            else:
                self.console.print(f"[bold red]new finding[/] {signature} (trial {trial_key}, {elapsed:.0f} s)")
        elif finding.state == "new" and workload and result.num_tokens < finding.result.num_tokens:
            # Not minimized yet: start the minimizer from the smallest failing trial seen.
            finding.engine, finding.workload, finding.result = engine, workload, result
        finding.trials += 1
        self.store.put_finding(finding)

    def note_behaviours(self, engine: dict, workload: dict, result: TrialResult) -> None:
        """Count what the engine did in a trial; one that did something seen fewer than 3 times is kept
        as a seed to explore around (coverage feedback from the engine itself, not only from knobs)."""
        seen = behaviours(result)
        rare = [b for b in seen if self.behaviours[b] < 3]
        self.behaviours.update(seen)
        if rare and workload:
            self.interesting.append((engine, workload))

    def snapshot(self) -> None:
        singles, pairs = self.coverage.fractions()
        self.timeline.append((round(self.elapsed(), 1), self.store.count_trials(), len(self.store.findings()),
                              round(singles, 4), round(pairs, 4)))
        self.save_clock()

    def run_group(self, group) -> str:
        """One group, stopped before any trial that would start after the budget ran out."""
        status = self.supervisor.run(group, self.done, time.time() + self.budget_left(), self.record_trial)
        if status == "rejected":
            self.rejected.add(group.key)
            message = next(g.message for g in reversed(self.store.groups()) if g.idx == group.index)
            exclusion = self.learned.record(group.index, group.engine, message or "")
            if exclusion is not None and len(self.learned.explained[exclusion]) == 1:
                self.console.print(f"  [bold]learned[/]: vLLM refuses {exclusion.describe()}; no longer drawn", highlight=False)
        return status

    def run(self) -> None:
        import ray

        from rollout_lab.hunt import report

        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        stop_on_signals()
        if self.resumed:
            self.console.print(f"[bold]resuming[/] {self.dir}: {len(self.done)} trials, {len(self.store.findings())} findings, "
                               f"{self.elapsed_before:.0f} s spent")
        groups, rest = 0, self.pending
        try:
            while self.budget_left() > 0 and (self.cfg.hunt.max_groups is None or groups < self.cfg.hunt.max_groups):
                index = self.store.next_group_index()
                # Near failures, and near engines that showed a rare behaviour (preemption, cache hits...).
                # A bug already hit 3 times is known: exploring around it again finds it again.
                hits = {f.signature: f.trials for f in self.store.findings()}
                fresh = [(e, w) for e, w, sig in self.failing if hits.get(sig, 0) < 3 and sig not in self.known]
                seeds = fresh + self.interesting
                if rest is not None:
                    group, rest = rest, None
                    group.index = index
                else:
                    group = self.planner.next_group(index, self.coverage, self.cfg.hunt.workloads_per_engine,
                                                    seeds, self.rejected, lambda p: self.learned.allows(with_pressure(p)))
                    group.engine = with_pressure(group.engine)
                status = self.run_group(group)
                if status == "rejected":
                    continue  # vLLM's validation refused it in the driver: no engine started
                groups += 1
                rest = rest_after_crash(group, status, self.done)
                self.snapshot()
                singles, pairs = self.coverage.fractions()
                self.console.print(
                    f"[dim]{self.elapsed():.0f}/{self.cfg.hunt.budget_s:.0f} s: {len(self.done)} trials, "
                    f"{len(self.store.findings())} findings, coverage {singles:.0%} values / {pairs:.0%} pairs; "
                    f"engine behaviours {dict(self.behaviours)}[/]")
                self.store.set_meta("behaviours", dict(self.behaviours))
                if self.cfg.hunt.minimize:
                    self.repros.minimize_new(self.budget_left)
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted[/]: writing the report; run again on this dir to resume")
        finally:
            self.snapshot()
            path = report.write(self.dir, self.store, self.coverage, self.timeline, self.cfg)
            self.console.print(f"[bold]report[/]: {path}")
