"""`python -m rollout_lab.hunt [overrides]`: search engine configurations and workloads for bugs.

    python -m rollout_lab.hunt hunt.budget_s=1800                 # a new hunt dir under hunts/
    python -m rollout_lab.hunt hydra.run.dir=hunts/mine           # resumes hunts/mine if it exists
    python -m rollout_lab.hunt fault=stale_state hunt.budget_s=1200

The loop: the planner proposes a group (an engine configuration and its workloads); a Ray task
runs it in its own process (runner.run_group) and writes one line per event; the driver reads the
lines as they come, records each trial in the store, keys failures by signature, and kills the
task when its engine stops taking steps for the trial timeout (a hang). A signature seen for the first time is a new
finding: it is minimized (`python -m rollout_lab.minimize` on its case.json, in a fresh process)
and its repro.py is run `verify_runs` times standalone for its reproduction rate.

Signatures (the dedup key): a crash is its exception type and innermost vLLM frames; a hang is
"hang@<phase>" and the model; a mismatch is the oracle that flagged it (reference before
metamorphic), the model, the dtype and the class of the flagged requests (preempted /
prefix_cached / any). The minimizer then names the knobs that switch it on (the finding's trigger).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rollout_lab.hunt.runner import ORACLE_ORDER
from rollout_lab.hunt.space import HuntRunConfig, register, with_pressure
from rollout_lab.minimize.standalone import SAME_CLASS

register()

REPO = Path(__file__).resolve().parents[2]


def signature_of(engine: dict, result: dict) -> str:
    """The dedup key of a failing trial (see the module doc)."""
    status = result.get("status")
    if status == "crash":
        return result["crash"]["key"]
    if status == "hang":
        return f"hang@{result.get('phase', 'trial')}:{engine.get('model')}"
    oracle = first_flagged(result["oracles"])
    klass = result["oracles"][oracle]["class"]
    # The minimizer counts flagged prefix-cache hits as the same failure as flagged ordinary
    # requests (standalone.SAME_CLASS): one fault hitting whichever requests hold a bad block is
    # one finding, not one per class of the requests it happened to land on.
    klass = "any" if klass in SAME_CLASS["any"] else klass
    return f"mismatch/{oracle}:{engine.get('model')}:{engine.get('engine.dtype', 'auto')}:{klass}"


def first_flagged(oracles: dict) -> str:
    """The oracle a failing trial's signature names: the first in ORACLE_ORDER that flagged."""
    return next(name for name in ORACLE_ORDER if (oracles.get(name) or {}).get("flagged"))


def duplicate_of(finding, minimized: list) -> Optional[object]:
    """The minimized mismatch finding that already explains `finding`, if any: same oracle, model
    and request class, and every knob of its minimal trigger set in `finding`'s engine as in its
    minimal case (dtype is no part of it unless the minimizer kept it). Crash signatures are
    already specific (exception type and vLLM frames); they are left alone."""
    from rollout_lab.hunt.space import engine_args
    from rollout_lab.minimize.reduce import KNOB_ARGS

    if finding.kind != "mismatch":
        return None
    oracle, model, _, klass = finding.signature.split(":")
    args = engine_args(finding.detail["engine"])
    for other in minimized:
        info = (other.detail or {}).get("minimized")
        if other.kind != "mismatch" or other is finding or info is None:
            continue
        o_oracle, o_model, _, o_klass = other.signature.split(":")
        if (o_oracle, o_model, o_klass) != (oracle, model, klass):
            continue
        names = [n for knob in info["knobs"] for n in KNOB_ARGS.get(knob, (knob,))]
        if all(args.get(n) == info["engine_args"].get(n) for n in names):
            return other
    return None


def known_bugs(folder: Optional[Path]) -> dict[str, str]:
    """Crash signature -> repro.py of each bug already reduced to a repro in `folder` (repro/<name>/repro.py)."""
    if folder is None or not folder.is_dir():
        return {}
    known = {}
    for repro in sorted(folder.glob("*/repro.py")):
        match = re.search(r"^EXPECTED = Expected\(kind='crash'.*?crash_key='([^']+)'", repro.read_text(), re.MULTILINE)
        if match:
            known[match.group(1)] = str(repro)
    return known


def seconds_for_minimization(left: float, verification: float, floor: float) -> float:
    """Seconds a minimization may try candidates: the hunt's budget left, less the verification
    that follows it, never below `floor` (a finding found late still gets a useful minimization)."""
    return max(left - verification, floor)


def stop_on_signals() -> None:
    """Ctrl-C, `kill -INT` and a scheduler's SIGTERM all stop the hunt as Ctrl-C does: the report is
    written and the dir resumes. (A shell starts a background job with SIGINT ignored; this undoes it.)"""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def slug(signature: str, index: int) -> str:
    return f"f{index:02d}-" + re.sub(r"[^\w.-]+", "_", signature)[:60].strip("_")


class Hunt:
    """The driver: plans groups, runs them on Ray, records, dedups, minimizes, reports."""

    def __init__(self, cfg: HuntRunConfig, hunt_dir: Path):
        from rich.console import Console

        from rollout_lab.config import fault_params
        from rollout_lab.hunt.search import Coverage, Planner
        from rollout_lab.hunt.space import Space
        from rollout_lab.hunt.store import Store

        self.cfg, self.dir = cfg, hunt_dir
        self.console = Console(soft_wrap=True)
        self.space = Space.from_config(cfg.hunt.space)
        self.fault = cfg.fault.name
        self.fault_params = fault_params(cfg.fault.name, dict(cfg.fault.params)) if cfg.fault.name else {}
        (hunt_dir / "lines").mkdir(parents=True, exist_ok=True)
        self.store = Store(hunt_dir / "hunt.db")
        previous = self.store.meta("config")
        if previous is not None and previous.get("fault") != self.fault:
            raise ValueError(f"hunt dir {hunt_dir} was hunted with fault={previous.get('fault')}; "
                             f"resume it with the same fault or pick a new dir")
        self.store.set_meta("config", {"fault": self.fault, "hunt": OmegaConf.to_container(OmegaConf.structured(cfg.hunt))})
        from rollout_lab.hunt.runner import valid_workload

        # Bugs already reduced to a repro in the repo: found again, they are marked known and
        # neither minimized nor explored around (a fuzzer's corpus of known crashes).
        self.known = known_bugs(REPO / cfg.hunt.known_repros if cfg.hunt.known_repros else None)
        self.planner = Planner(self.space, cfg.hunt.seed, cfg.hunt.candidates, cfg.hunt.exploit, valid_workload)
        self.coverage = Coverage(self.space.dims())
        # (engine, workload, signature) of failing trials.
        self.failing: list[tuple[dict, dict, str]] = []
        # Engine behaviours seen (the fuzzer's edges) and trials that showed a rare one.
        self.behaviours: Counter = Counter()
        self.interesting: list[tuple[dict, dict]] = []
        self.done = self.store.trial_keys()
        self.elapsed_before = float(self.store.meta("elapsed_s", 0.0))
        self.session_start = time.time()
        self.timeline: list[tuple[float, int, int, float, float]] = self.store.meta("timeline", [])
        # Seconds of each standalone repro.py run this session: what a verification will cost.
        self.verify_seconds: list[float] = []
        for trial in self.store.trials():
            if trial["status"] != "rejected":
                self.coverage.record(trial["engine"] | trial["workload"])
            if trial["status"] in ("fail", "crash") and trial["workload"]:
                self.failing.append((trial["engine"], trial["workload"], trial["signature"]))
            self.note_behaviours(trial["engine"], trial["workload"], trial["result"])
        self.recover()
        self.rejected = {g["key"] for g in self.store.groups() if g["status"] == "rejected"}
        self.resumed = bool(self.done) or self.store.next_group_index() > 0

    def recover(self) -> None:
        """Groups a killed hunt left running: record the results their lines hold, mark them killed."""
        for g in self.store.groups():
            if g["status"] != "running":
                continue
            events, _ = read_lines(self.dir / "lines" / f"group_{g['idx']:04d}.jsonl", 0)
            for event in events:
                if event["event"] == "result" and event["trial"] not in self.done:
                    self.record_trial(g, event["trial"], event.get("point", {}), event)
            self.store.end_group(g["idx"], "killed", "the hunt was stopped while this group ran")

    # the clock, across resumes
    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.session_start

    def save_clock(self) -> None:
        self.store.set_meta("elapsed_s", self.elapsed())
        self.store.set_meta("timeline", self.timeline)

    def budget_left(self) -> float:
        return self.cfg.hunt.budget_s - self.elapsed()

    # recording
    def record_trial(self, group: dict, trial_key: str, workload: dict, result: dict) -> None:
        from rollout_lab.hunt.store import Finding

        status = result.get("status", "crash")
        crash = result.get("crash") or {}
        if status == "crash" and not crash.get("vllm_frames") and "rollout_lab/" in crash.get("traceback", ""):
            # Raised by our own harness with no vLLM frame on the stack: a rollout_lab bug, not a finding.
            status = result["status"] = "harness_error"
            self.console.print(f"[bold red]harness error[/] (a rollout_lab bug, not a finding): "
                               f"{crash.get('exception_type')}: {crash.get('message')}", highlight=False)
        signature = signature_of(group["engine"], result) if status in ("fail", "crash", "hang") else None
        elapsed = self.elapsed()
        self.store.add_trial(trial_key, group["idx"], group["engine"], workload, status, signature, result,
                             float(result.get("seconds", 0.0)), elapsed)
        self.done.add(trial_key)
        self.store.set_meta("elapsed_s", elapsed)
        if status != "rejected":  # refused by vLLM's validation: nothing was exercised
            self.coverage.record(group["engine"] | workload)
            self.note_behaviours(group["engine"], workload, result)
        if signature is None:
            return
        if workload:
            self.failing.append((group["engine"], workload, signature))
        finding = self.store.finding(signature)
        if finding is None:
            number = self.store.count_trials()
            finding = Finding(signature, "mismatch" if status == "fail" else status, trial_key, elapsed, number, 0,
                              str(group["engine"].get("model")), str(group["engine"].get("engine.dtype", "auto")),
                              detail={"engine": group["engine"], "workload": workload, "result": result})
            if signature in self.known:
                finding.state, finding.repro = "known", self.known[signature]
                self.console.print(f"[yellow]known bug[/] {signature} ({self.known[signature]}; not minimized again)")
            else:
                self.console.print(f"[bold red]new finding[/] {signature} (trial {trial_key}, {elapsed:.0f} s)")
        elif finding.state == "new" and workload and result.get("num_tokens", 1e9) < finding.detail["result"].get("num_tokens", 1e9):
            # Not minimized yet: start the minimizer from the smallest failing trial seen.
            finding.detail = {"engine": group["engine"], "workload": workload, "result": result}
        finding.trials += 1
        self.store.put_finding(finding)

    def note_behaviours(self, engine: dict, workload: dict, result: dict) -> None:
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

    def rest_after_crash(self, group, status: str):
        """The group's untried workloads on a fresh engine of the same configuration, after a crash in
        one of its trials (a crashed engine is in no known state). None when there are none, when
        the engine itself failed to start (it would again), or when the crash came on the group's
        first trial: an engine that crashes on whatever it is given first costs a start per trial."""
        from rollout_lab.hunt.search import Group

        if status != "crash" or f"{group.key}-start" in self.done:
            return None
        ran = sum(group.trial_key(w) in self.done for w in group.workloads)
        left = [w for w in group.workloads if group.trial_key(w) not in self.done]
        return Group(group.index, group.engine, left, "rest after a crash") if left and ran >= 2 else None

    # one group on Ray
    def run_group(self, group) -> str:
        """Run one group to its end; its status (ok, rejected, crash, hang, died, skipped)."""
        import ray

        from rollout_lab.hunt.runner import GroupSpec, run_group, validate_engine
        from rollout_lab.models import resolve_model

        workloads = [w for w in group.workloads if group.trial_key(w) not in self.done]
        started = time.time()
        self.store.add_group(group.index, group.key, group.engine, group.reason, started)
        record = {"idx": group.index, "engine": group.engine}
        if not workloads:
            self.store.end_group(group.index, "skipped", "every workload already tried")
            return "skipped"
        complaint = validate_engine(group.engine, resolve_model(group.engine["model"]))
        if complaint is not None:
            self.store.end_group(group.index, "rejected", complaint)
            self.rejected.add(group.key)
            self.console.print(f"[bold]group {group.index}[/] [yellow]rejected[/] by vLLM's config validation: {complaint}",
                               highlight=False)
            return "rejected"
        o = self.cfg.hunt.oracles
        cores = os.cpu_count() or 1
        spec = GroupSpec(
            group.key, group.engine, resolve_model(group.engine["model"]),
            [{"key": group.trial_key(w), "point": w} for w in workloads],
            self.fault, self.fault_params, dict(o.reference_tolerance), dict(o.metamorphic_tolerance),
            threads=max(cores // self.cfg.hunt.parallel, 1),
        )
        lines_path = self.dir / "lines" / f"group_{group.index:04d}.jsonl"
        lines_path.unlink(missing_ok=True)
        # max_calls=1: the process exits after its group, and the engine's memory with it.
        # On a GPU node each engine in flight takes an equal share of the node's GPUs.
        gpus = ray.cluster_resources().get("GPU", 0) / self.cfg.hunt.parallel
        task = ray.remote(max_calls=1, max_retries=0)(run_group).options(
            num_cpus=max(cores // self.cfg.hunt.parallel, 1), num_gpus=min(gpus, 1.0))
        ref = task.remote(spec, str(lines_path))
        by_key = {group.trial_key(w): w for w in workloads}
        self.console.print(
            f"[bold]group {group.index}[/] ({group.reason}) {group.engine.get('model')} "
            f"{json.dumps({k.removeprefix('engine.'): v for k, v in group.engine.items() if k != 'model'})}: "
            f"{len(workloads)} workloads", highlight=False)
        offset, current, last_progress, engine_up, status, message = 0, None, time.time(), False, "ok", ""
        steps = -1
        while True:
            finished = bool(ray.wait([ref], timeout=1.0)[0])
            events, offset = read_lines(lines_path, offset)
            for event in events:
                if event["event"] == "beat":
                    # Progress only when the engine took a step since the last beat.
                    if event["steps"] > steps:
                        steps, last_progress = event["steps"], time.time()
                    continue
                last_progress = time.time()
                if event["event"] == "engine":
                    engine_up = event["status"] == "ok"
                    self.store.end_group(group.index, "running", "", event.get("seconds"))
                    if event["status"] != "ok":
                        status, message = event["status"], event.get("message") or event["crash"]["message"]
                        if status == "crash":
                            self.record_trial(record, f"{group.key}-start", {}, {"status": "crash", "crash": event["crash"],
                                                                                  "phase": "engine_start"})
                elif event["event"] == "start":
                    current = event["trial"]
                elif event["event"] == "result":
                    current = None
                    self.record_trial(record, event["trial"], by_key[event["trial"]], event)
                    self.report_trial(event)
                    if event["status"] == "crash":
                        status = "crash"
            if finished:
                break
            limit = self.cfg.hunt.oracles.trial_timeout_s if engine_up else self.cfg.hunt.oracles.engine_start_timeout_s
            if time.time() - last_progress > limit:
                phase = "trial" if engine_up else "engine_start"
                ray.cancel(ref, force=True)
                key = current if current is not None else f"{group.key}-start"
                self.record_trial(record, key, by_key.get(current, {}), {"status": "hang", "phase": phase,
                                                                        "seconds": time.time() - last_progress})
                status, message = "hang", f"no progress for {limit:.0f} s ({phase})"
                break
        if status == "ok" and (not engine_up or current is not None):
            # The process ended with a trial (or the engine start) unfinished: it died.
            status, message = "died", "the engine process ended without a word (killed? out of memory?)"
            try:
                ray.get(ref)
            except Exception as exc:  # the task's own failure is the message
                message = " ".join(str(getattr(exc, "cause", None) or exc).split())[:300]
            phase = "trial" if engine_up else "engine_start"
            key = current if current is not None else f"{group.key}-start"
            self.record_trial(record, key, by_key.get(current, {}), {"status": "crash", "phase": phase, "crash": {
                "key": f"ProcessDied@{phase}", "message": message}})
        self.store.end_group(group.index, status, message)
        if status == "rejected":
            self.rejected.add(group.key)
            self.console.print(f"  [yellow]rejected[/]: {message}", highlight=False)
        return status

    def report_trial(self, event: dict) -> None:
        if event["status"] == "rejected":
            self.console.print(f"  trial {event['trial']}: [yellow]rejected[/] {event['message']}", highlight=False)
            return
        if event["status"] == "crash":
            self.console.print(f"  trial {event['trial']}: [red]crash[/] {event['crash']['key']}", highlight=False)
            return
        ref, meta = event["oracles"]["reference"], event["oracles"]["metamorphic"]
        alone = event["oracles"].get("batch_invariance") or {}
        invariance = f" batch vs alone {alone['identical']}/{alone['requests']} identical" if alone.get("requests") else ""
        colour = "red" if event["status"] == "fail" else "green"
        self.console.print(
            f"  trial {event['trial']}: [{colour}]{event['status']}[/] {event['num_requests']} requests, "
            f"{event['num_tokens']} tokens, {event['preempted_requests']} preempted, {event['cached_requests']} cached; "
            f"max |ref| {ref['max']:.2g} |alone| {meta['max']:.2g}{invariance} ({event['seconds']:.1f} s)", highlight=False)

    # findings -> repros
    def minimize_new(self) -> None:
        from rollout_lab.hunt.report import trigger_text
        from rollout_lab.hunt.store import Finding

        for index, finding in enumerate(self.store.findings()):
            if finding.state != "new" or self.budget_left() <= 0:
                continue
            name = slug(finding.signature, index)
            original = duplicate_of(finding, [f for f in self.store.findings() if f.state in ("verified", "flaky")])
            if original is not None:
                finding.state, finding.trigger, finding.repro = "duplicate", original.trigger, original.repro
                finding.repro_rate = original.repro_rate
                finding.detail = finding.detail | {"duplicate_of": original.signature}
                self.store.put_finding(finding)
                self.console.print(f"[bold]duplicate[/] {finding.signature}: the trigger of {original.signature} "
                                   f"({trigger_text(original.trigger)}) holds in its engine; not minimized", highlight=False)
                continue
            why = None
            if finding.kind == "hang":
                why = "the minimizer replays crashes and mismatches, not hangs"
            elif finding.signature.startswith("mismatch/metamorphic:"):
                # The reference oracle ran and passed the sampled logprobs: the re-scoring pass
                # (prompt_logprobs, one request alone) is the side that went wrong.
                why = ("the sampled logprobs match the float32 reference; the re-scoring pass (prompt_logprobs, "
                       "alone) disagreed with both, and the minimizer replays sampling, not prompt_logprobs")
            elif finding.signature.startswith("mismatch/batch_invariance:"):
                why = ("vLLM promised batch invariance and a request's output changed when run alone; the minimizer "
                       "compares with the float32 reference, not batch against alone (python -m rollout_lab.invariance "
                       "measures it on this engine configuration)")
            if why is not None:
                finding.state = "no_repro"
                finding.detail = (finding.detail or {}) | {"why": why}
                self.store.put_finding(finding)
                self.console.print(f"[yellow]not minimized[/] {finding.signature}: {why}", highlight=False)
                continue
            self.console.print(f"[bold]minimizing[/] {finding.signature} -> {self.dir / 'repro' / name}")
            log = self.dir / "repro" / f"{name}.minimize.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            # With a planted fault, first without it: a finding that still fails is vLLM's own bug,
            # and its repro.py should carry no planted fault. Exit 2: it did not fail without it.
            attempts = [False, True] if self.fault else [False]
            for with_fault in attempts:
                case_path = self.write_case(finding, name, with_fault)
                extra = ["--calibration-runs", "2"] if with_fault is False and self.fault else []
                extra += ["--budget-s", f"{self.minimize_budget():.0f}"]
                with log.open("a") as out:
                    done = subprocess.run([sys.executable, "-m", "rollout_lab.minimize", str(case_path), "--out",
                                           str(self.dir / "repro"), "--name", name, "--no-verify", *extra],
                                          cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
                if done.returncode != 2:
                    break
            finding.detail = finding.detail | {"needs_planted_fault": bool(self.fault) and with_fault}
            self.finish_finding(finding, name, done.returncode, log)

    def minimize_budget(self) -> float:
        """Seconds for one minimization: what is left once its repro's verification is set aside."""
        hunt = self.cfg.hunt
        runs = hunt.verify_runs + (1 if self.fault else 0)
        per_run = max(self.verify_seconds, default=hunt.verify_run_s)
        return seconds_for_minimization(self.budget_left(), runs * per_run, hunt.minimize_floor_s)

    def write_case(self, finding, name: str, with_fault: bool = True) -> Path:
        """The finding's first failing trial as the minimizer's case.json (with the hunt's planted fault or not)."""
        from rollout_lab.hunt.space import engine_args

        detail = finding.detail
        engine, result = detail["engine"], detail["result"]
        args = engine_args(engine) | {"disable_log_stats": False}
        dtype = result.get("dtype") or engine.get("engine.dtype", "float32")
        tolerance = float(dict(self.cfg.hunt.oracles.reference_tolerance).get(dtype, 1e-3))
        if finding.kind == "crash":
            case = result.get("case_for_crash") or {"requests": [{"prompt_token_ids": [1, 2, 3], "seed": 0}], "max_tokens": 4}
            expected = {"kind": "crash", "spike_threshold": tolerance, "crash_key": result["crash"]["key"]}
        else:
            case = result["case"]
            oracle = first_flagged(result["oracles"])
            expected = {"kind": "mismatch", "spike_threshold": tolerance,
                        "request_class": result["oracles"][oracle]["class"] or "any"}
        data = {
            "model": engine["model"],
            "description": f"hunt trial {finding.first_trial}: {finding.signature}",
            "case": {"model": engine["model"], "engine_args": args, **case, "fault": self.fault if with_fault else None,
                     "fault_params": self.fault_params if with_fault else {}},
            "expected": expected,
        }
        path = self.dir / "findings" / name / "case.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        return path

    def finish_finding(self, finding, name: str, returncode: int, log: Path) -> None:
        from rollout_lab.minimize.emit import run_isolated

        out = self.dir / "repro" / name
        minimized = out / "minimized.json"
        if returncode != 0 or not minimized.is_file():
            tail = log.read_text()[-400:].strip().splitlines()
            finding.state = "not_minimized"
            finding.detail = finding.detail | {"why": tail[-1] if tail else f"minimizer exit {returncode}"}
            self.store.put_finding(finding)
            self.console.print(f"  [yellow]not minimized[/]: {finding.detail['why']}", highlight=False)
            return
        info = json.loads(minimized.read_text())
        # The knobs that stayed off their defaults, and the planted fault when the failure needs it.
        finding.trigger = info["knobs"] + ([f"fault={self.fault}"] if finding.detail.get("needs_planted_fault") else [])
        finding.repro = str(out / "repro.py")
        finding.state = "minimized"
        self.store.put_finding(finding)
        runs = self.cfg.hunt.verify_runs
        lab_args = tuple(info.get("verify_args", ()))
        verifications = [run_isolated(out / "repro.py", lab_args) for _ in range(runs)]
        self.verify_seconds += [v.seconds for v in verifications]
        # The verdict as an exit status (1 reproduced, 0 not, 2 cannot run): a repro that never ran is no reproduction.
        exits = [v.status for v in verifications]
        finding.repro_rate = f"{sum(e == 1 for e in exits)}/{runs}"
        needs_fault = finding.detail.get("needs_planted_fault")
        off = run_isolated(out / "repro.py", (*lab_args, "--no-fault")).status if needs_fault else None
        finding.detail = finding.detail | {"minimized": info, "verify_exits": exits, "no_fault_exit": off}
        finding.state = "verified" if exits.count(1) == runs else "flaky"
        self.store.put_finding(finding)
        self.console.print(f"  repro {finding.repro}: reproduced {finding.repro_rate} standalone; trigger {finding.trigger}"
                           + (f"; with the fault off: exit {off}" if off is not None else ""), highlight=False)

    def run(self) -> None:
        import ray

        from rollout_lab.hunt import report

        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        stop_on_signals()
        if self.resumed:
            self.console.print(f"[bold]resuming[/] {self.dir}: {len(self.done)} trials, {len(self.store.findings())} findings, "
                               f"{self.elapsed_before:.0f} s spent")
        groups, resume_after_crash = 0, None
        try:
            while self.budget_left() > 0 and (self.cfg.hunt.max_groups is None or groups < self.cfg.hunt.max_groups):
                index = self.store.next_group_index()
                # Near failures, and near engines that showed a rare behaviour (preemption, cache hits...).
                # A bug already hit 3 times is known: exploring around it again finds it again.
                hits = {f.signature: f.trials for f in self.store.findings()}
                fresh = [(e, w) for e, w, sig in self.failing if hits.get(sig, 0) < 3 and sig not in self.known]
                seeds = fresh + self.interesting
                if resume_after_crash is not None:
                    group, resume_after_crash = resume_after_crash, None
                    group.index = index
                else:
                    group = self.planner.next_group(index, self.coverage, self.cfg.hunt.workloads_per_engine,
                                                    seeds, self.rejected)
                    group.engine = with_pressure(group.engine)
                status = self.run_group(group)
                if status == "rejected":
                    continue  # vLLM's validation refused it in the driver: no engine started
                groups += 1
                resume_after_crash = self.rest_after_crash(group, status)
                self.snapshot()
                singles, pairs = self.coverage.fractions()
                self.console.print(
                    f"[dim]{self.elapsed():.0f}/{self.cfg.hunt.budget_s:.0f} s: {len(self.done)} trials, "
                    f"{len(self.store.findings())} findings, coverage {singles:.0%} values / {pairs:.0%} pairs; "
                    f"engine behaviours {dict(self.behaviours)}[/]")
                self.store.set_meta("behaviours", dict(self.behaviours))
                if self.cfg.hunt.minimize:
                    self.minimize_new()
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted[/]: writing the report; run again on this dir to resume")
        finally:
            self.snapshot()
            path = report.write(self.dir, self.store, self.coverage, self.timeline, self.cfg)
            self.console.print(f"[bold]report[/]: {path}")


def behaviours(result: dict) -> list[str]:
    """The engine behaviours a trial exercised, from what vLLM reported."""
    if result.get("status") in ("crash", "hang"):
        return [f"status:{result['status']}"]
    if "num_tokens" not in result:
        return []
    seen = {
        "preempted": result.get("preempted_requests", 0) > 0,
        "prefix_cache_hit": result.get("cached_requests", 0) > 0,
        "aborted": result.get("num_aborted", 0) > 0,
        "stepped_trace": not result.get("batch", True),
    }
    return [name for name, on in seen.items() if on] or ["plain"]


def read_lines(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines of `path` from byte `offset`; (events, new offset)."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events, offset + end


@hydra.main(version_base=None, config_path="../../conf", config_name="hunt_run")
def main(dict_cfg: DictConfig) -> None:
    from rollout_lab.config import ConfigError, check_keys
    from rollout_lab.hunt.store import StoreError

    # vLLM's INFO lines (the driver validates engine configs) would bury the progress lines.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        check_keys(dict_cfg, HuntRunConfig)
        cfg: HuntRunConfig = OmegaConf.to_object(dict_cfg)
        hunt_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
        hunt = Hunt(cfg, hunt_dir)
    except (ConfigError, StoreError, ValueError) as exc:
        print(f"rollout_lab.hunt: {exc}", file=sys.stderr)
        sys.exit(2)
    hunt.run()


if __name__ == "__main__":
    main()
