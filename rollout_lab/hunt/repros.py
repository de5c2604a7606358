"""Minimize and verify: each new finding -> findings/<name>/case.json -> `python -m rollout_lab.minimize`
in a fresh process -> repro/<name>/repro.py + minimized.json -> the repro run `verify_runs` times
standalone for its reproduction rate (with a planted fault, once more with it off).

`python -m rollout_lab.hunt.repros HUNT_DIR TRIAL_KEY` writes one failing trial's case.json by hand."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

from rollout_lab.hunt.protocol import Finding, Signature, write_known_bug
from rollout_lab.hunt.space import HuntRunConfig, OracleConfig
from rollout_lab.hunt.store import Store
from rollout_lab.hunt.triage import duplicate_of, why_not_minimized
from rollout_lab.minimize.handoff import CaseFile, HandoffError, MinimizedResult
from rollout_lab.oracles import oracle_of

REPO = Path(__file__).resolve().parents[2]


def seconds_for_minimization(left: float, verification: float, floor: float) -> float:
    """Seconds a minimization may try candidates: the hunt's budget left, less the verification
    that follows it, never below `floor` (a finding found late still gets a useful minimization)."""
    return max(left - verification, floor)


def slug(signature: Signature, index: int) -> str:
    """The finding's folder name under findings/ and repro/."""
    return f"f{index:02d}-" + re.sub(r"[^\w.-]+", "_", str(signature))[:60].strip("_")


def case_file(finding: Finding, reference_tolerance: dict[str, float], fault: str | None, fault_params: dict) -> CaseFile:
    """The finding's smallest failing trial as the minimizer's case (with the planted fault, or None)."""
    from rollout_lab import config
    from rollout_lab.hunt.space import engine_args, engine_env
    from rollout_lab.minimize.standalone import Case, Request
    from rollout_lab.tolerances import oracle_row

    result, model = finding.result, finding.model
    dtype = result.dtype or finding.engine.get("engine.dtype", "float32")
    # The row the trial's reference oracle judged by (fp8_kv for an fp8 KV cache, runner.run_trial).
    tolerance = float(reference_tolerance[oracle_row(dtype, finding.engine.get("engine.kv_cache_dtype"))])
    expected = oracle_of(finding.signature).expected(finding, tolerance)
    # An engine that crashed at start left no requests: one short request stands in (the minimizer
    # reduces only the engine knobs of such a case; the repro.py generates it once the engine starts).
    case = result.case or Case(model, engine_args(finding.engine) | {"disable_log_stats": False},
                               [Request([1, 2, 3], 0, prompt_index=0, sample_index=0)], max_tokens=4)
    # Checked against the fault's parameters here, where the hunt hands the case over, and again by CaseFile.read.
    case.fault, case.fault_params = fault, config.fault_params(fault, fault_params) if fault else {}
    case.env = engine_env(finding.engine)
    # The pressure preset's head, moved before the trial (runner.run_group): the minimizer moves it too.
    case.block_pool_head = finding.engine.get("block_pool_head")
    # The case is the smallest failing trial's (Finding.engine/workload/result), not always the first one's.
    return CaseFile(model, case, expected, f"hunt trial: the smallest of the {finding.trials} failing "
                    f"(first seen in trial {finding.first_trial}): {finding.signature}")


def trial_case_file(hunt_dir: Path, trial_key: str) -> CaseFile:
    """The case.json the hunt would hand the minimizer for one failing trial of `hunt_dir` (by its key),
    with the hunt's planted fault when it ran with one (its config in .hydra/, where Hydra put it)."""
    from omegaconf import OmegaConf

    from rollout_lab.config import fault_params as fault_defaults

    store = Store(hunt_dir / "hunt.db")
    row = next((t for t in store.trials() if t.key == trial_key), None)
    if row is None or row.signature is None:
        failing = [t.key for t in store.trials() if t.signature is not None]
        raise HandoffError(f"{hunt_dir}: no failing trial {trial_key!r}; failing trials: {', '.join(failing) or 'none'}")
    saved = hunt_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(saved) if saved.is_file() else OmegaConf.create()
    fault = OmegaConf.select(cfg, "fault.name")
    params = fault_defaults(fault, dict(OmegaConf.select(cfg, "fault.params", default={}))) if fault else {}
    tolerance = OmegaConf.select(cfg, "hunt.oracles.reference_tolerance") or OracleConfig().reference_tolerance
    finding = Finding(row.signature, row.key, row.elapsed, 0, 1, row.engine, row.workload, row.result)
    return case_file(finding, dict(tolerance), fault, params)


def main(argv: list[str] | None = None) -> int:
    """`python -m rollout_lab.hunt.repros HUNT_DIR TRIAL_KEY [--out case.json]`: write a failing trial's
    case.json, to run `python -m rollout_lab.minimize` on it by hand (on another machine, say)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rollout_lab.hunt.repros", description=main.__doc__.splitlines()[0])
    parser.add_argument("hunt_dir", type=Path, help="a hunt dir (holding hunt.db)")
    parser.add_argument("trial", help="the failing trial's key (HUNT_REPORT.md's 'first trial', findings.csv)")
    parser.add_argument("--out", type=Path, help="where the case goes (default: HUNT_DIR/findings/<trial>/case.json)")
    args = parser.parse_args(argv)
    if not (args.hunt_dir / "hunt.db").is_file():
        print(f"rollout_lab.hunt.repros: {args.hunt_dir} holds no hunt.db", file=sys.stderr)
        return 2
    try:
        case = trial_case_file(args.hunt_dir, args.trial)
    except HandoffError as exc:
        print(f"rollout_lab.hunt.repros: {exc}", file=sys.stderr)
        return 2
    path = case.write(args.out or args.hunt_dir / "findings" / args.trial / "case.json")
    print(f"{path}: {case.description}; {case.expected.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# The minimizer's own complaint ("rollout_lab.minimize: ..."), else the exception line a traceback ends with.
_MINIMIZER_SAYS = re.compile(r"^rollout_lab\.minimize: (.+)$", re.MULTILINE)
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt|Exit)\b.*$", re.MULTILINE)


def minimizer_error(log: str, returncode: int) -> str:
    """Why a minimization failed, from its log: the minimizer's own error line, else the last
    exception a traceback printed, else its exit status (never whatever warning came last)."""
    said = _MINIMIZER_SAYS.findall(log)
    if said:
        return said[-1].strip()
    raised = _EXCEPTION_LINE.findall(log[log.rfind("Traceback (most recent call last)"):]) if "Traceback" in log else []
    return raised[-1].strip() if raised else f"minimizer exit {returncode}, no error line in its log"


class Repros:
    """Turns the store's new findings into verified repros, within the hunt's budget."""

    def __init__(self, cfg: HuntRunConfig, hunt_dir: Path, store: Store, fault_params: dict, console):
        self.cfg, self.dir, self.store, self.console = cfg, hunt_dir.resolve(), store, console
        self.fault, self.fault_params = cfg.fault.name, fault_params
        # Seconds of each standalone repro.py run this session: what a verification will cost.
        self.verify_seconds: list[float] = []

    def budget(self, left: float) -> float:
        """Seconds for one minimization: what is left once its repro's verification is set aside."""
        hunt = self.cfg.hunt
        runs = hunt.verify_runs + (1 if self.fault else 0)
        per_run = max(self.verify_seconds, default=hunt.verify_run_s)
        return seconds_for_minimization(left, runs * per_run, hunt.minimize_floor_s)

    def minimize_new(self, budget_left: Callable[[], float]) -> None:
        """Each finding not yet minimized (or minimized but not verified, by a hunt stopped in between)."""
        from rollout_lab.hunt.report import trigger_text

        for index, finding in enumerate(self.store.findings()):
            if finding.state not in ("new", "minimized") or budget_left() <= 0:
                continue
            name = slug(finding.signature, index)
            if finding.state == "minimized":
                self.verify(finding, name)
                continue
            original = duplicate_of(finding, [f for f in self.store.findings() if f.state in ("verified", "flaky")])
            if original is not None:
                finding.state, finding.trigger, finding.repro = "duplicate", original.trigger, original.repro
                finding.repro_rate, finding.duplicate_of = original.repro_rate, str(original.signature)
                self.store.put_finding(finding)
                self.console.print(f"[bold]duplicate[/] {finding.signature}: the trigger of {original.signature} "
                                   f"({trigger_text(original.trigger)}) holds in its engine; not minimized", highlight=False)
                continue
            why = why_not_minimized(finding)
            if why is not None:
                finding.state, finding.why = "no_repro", why
                self.store.put_finding(finding)
                self.console.print(f"[yellow]not minimized[/] {finding.signature}: {why}", highlight=False)
                continue
            self.minimize(finding, name, budget_left)

    def minimize(self, finding: Finding, name: str, budget_left: Callable[[], float]) -> None:
        self.console.print(f"[bold]minimizing[/] {finding.signature} -> {self.dir / 'repro' / name}")
        log = self.dir / "repro" / f"{name}.minimize.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # With a planted fault, first without it: a finding that still fails is vLLM's own bug,
        # and its repro.py should carry no planted fault. Exit 2: it did not fail without it.
        for with_fault in [False, True] if self.fault else [False]:
            case_path = case_file(finding, dict(self.cfg.hunt.oracles.reference_tolerance), self.fault if with_fault else None,
                                  self.fault_params).write(self.dir / "findings" / name / "case.json")
            extra = ["--calibration-runs", "2"] if with_fault is False and self.fault else []
            extra += ["--budget-s", f"{self.budget(budget_left()):.0f}"]
            with log.open("a") as out:
                done = subprocess.run([sys.executable, "-m", "rollout_lab.minimize", str(case_path), "--out",
                                       str(self.dir / "repro"), "--name", name, "--confirm-only", *extra],
                                      cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 2:
                break
        finding.needs_planted_fault = bool(self.fault) and with_fault
        # Exit 1: minimized, but its repro.py did not reproduce in a fresh process; verify() measures how often.
        if done.returncode not in (0, 1) or not (self.dir / "repro" / name / MinimizedResult.FILE).is_file():
            finding.state, finding.why = "not_minimized", minimizer_error(log.read_text(), done.returncode)
            self.store.put_finding(finding)
            self.console.print(f"  [yellow]not minimized[/]: {finding.why}", highlight=False)
            return
        finding.state = "minimized"
        finding.repro = str(Path("repro") / name / "repro.py")
        self.store.put_finding(finding)
        self.verify(finding, name)

    def verify(self, finding: Finding, name: str) -> None:
        """Run the minimized finding's repro.py standalone: its reproduction rate and, with a planted
        fault, its exit with the fault off; a crash's folder is marked with its signature (a known
        bug once the folder is copied into the repo's repro/)."""
        from rollout_lab.minimize.emit import run_isolated
        from rollout_lab.models import resolve_model

        out = self.dir / "repro" / name
        try:
            info = MinimizedResult.read(out)
        except HandoffError as exc:
            finding.state, finding.why = "not_minimized", str(exc)
            self.store.put_finding(finding)
            return
        # The knobs that stayed off their defaults, the engine's vLLM environment variables (kept as
        # they were: not reduced), and the planted fault when the failure needs it.
        finding.trigger = (info.knobs + [f"{k}={v}" for k, v in sorted(info.env.items())]
                           + ([f"fault={self.fault}"] if finding.needs_planted_fault else [])
                           + ([f"warm-up of {info.warmup_requests} request(s)"] if info.warmup_requests else []))
        finding.minimized = info
        # A resumed hunt on a bare machine may not have built the lab's copy of the model yet.
        resolve_model(finding.model)
        runs = self.cfg.hunt.verify_runs
        verifications = [run_isolated(out / "repro.py", tuple(info.verify_args)) for _ in range(runs)]
        self.verify_seconds += [v.seconds for v in verifications]
        # The verdict as an exit status (1 reproduced, 0 not, 2 cannot run): a repro that never ran is no reproduction.
        finding.verify_exits = [v.status for v in verifications]
        finding.repro_rate = f"{finding.verify_exits.count(1)}/{runs}"
        if finding.needs_planted_fault:
            finding.no_fault_exit = run_isolated(out / "repro.py", (*info.verify_args, "--no-fault")).status
        finding.state = "verified" if finding.verify_exits.count(1) == runs else "flaky"
        if oracle_of(finding.signature).known_bug and not finding.needs_planted_fault:
            write_known_bug(out, finding.signature)
        self.store.put_finding(finding)
        off = finding.no_fault_exit
        self.console.print(f"  repro {finding.repro}: reproduced {finding.repro_rate} standalone; trigger {finding.trigger}"
                           + (f"; with the fault off: exit {off}" if off is not None else ""), highlight=False)
