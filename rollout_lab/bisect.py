"""Regression range of a repro.py over vLLM releases, each run in its own cached venv.

    python -m rollout_lab.bisect repro/<name>/repro.py --versions 0.27.1,0.29.0,0.32.0 [-- --model DIR]

Every release given is run (a handful, each minutes): the verdicts of all of them show a fix or
a second regression that a binary search would step over. A repro prints one verdict line
(`REPRODUCED: ...`, `NOT REPRODUCED: ...`, `CANNOT RUN: why`) and exits 1 / 0 / 2; anything
else (no verdict line, a verdict that disagrees with the exit code, a timeout) is "cannot run".
The table goes to stdout and into the "Regression range" section of the REPORT.md beside the repro.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from packaging.version import InvalidVersion, Version

from rollout_lab import releases

REPRODUCED, CLEAN, CANNOT_RUN = "reproduced", "clean", "cannot run"
# The verdict line's prefix -> (outcome, the exit code the contract pairs with it).
VERDICTS = {"REPRODUCED": (REPRODUCED, 1), "NOT REPRODUCED": (CLEAN, 0), "CANNOT RUN": (CANNOT_RUN, 2)}
SECTION = "Regression range"


@dataclass(frozen=True)
class ReleaseResult:
    """One release's outcome: reproduced, clean or cannot run, with the verdict line or the reason."""

    release: str
    outcome: str
    why: str
    seconds: float = 0.0
    torch: str = ""
    transformers: str = ""


def parse_verdict(returncode: int, output: str) -> tuple[str, str]:
    """(outcome, why) from a repro's exit code and output: its last verdict line, checked against
    the exit code the contract pairs it with."""
    for line in reversed(output.splitlines()):
        for prefix, (outcome, code) in VERDICTS.items():
            if line.startswith(prefix + ":"):
                why = line[len(prefix) + 1 :].strip()
                if returncode != code:
                    return CANNOT_RUN, f"verdict {prefix} but exit code {returncode} (the contract pairs it with {code})"
                return outcome, why
    tail = [line.strip() for line in output.splitlines() if line.strip()]
    return CANNOT_RUN, f"no verdict line (exit code {returncode}; last output: {tail[-1][:200] if tail else 'none'})"


def release_key(release: str) -> Version:
    try:
        return Version(release)
    except InvalidVersion:
        raise ValueError(f"--versions: {release!r} is not a release number (valid: 0.29.0, 0.27.1, ...)") from None


@dataclass(frozen=True)
class Range:
    """Where the outcome changed, releases in ascending order: the first bad release lies in
    (last_good, first_bad]; untested are the releases between them that could not run."""

    last_good: Optional[str]
    first_bad: Optional[str]
    untested: tuple[str, ...] = ()
    fixed_in: Optional[str] = None

    def summary(self, results: list[ReleaseResult]) -> str:
        ran = [r for r in results if r.outcome != CANNOT_RUN]
        if not ran:
            return "no release could run the repro: no range"
        if self.first_bad is None:
            return f"clean in every release that ran ({', '.join(r.release for r in ran)}): no regression in range"
        if self.last_good is None:
            line = f"reproduced from the oldest release that ran ({self.first_bad}): first bad is {self.first_bad} or older"
        else:
            line = f"first bad release: {self.first_bad} (last good: {self.last_good})"
            if self.untested:
                line += f"; the regression may be in {', '.join(self.untested)} (could not run), so first bad is in ({self.last_good}, {self.first_bad}]"
        if self.fixed_in:
            line += f"; clean again from {self.fixed_in}"
        return line


def regression_range(results: list[ReleaseResult]) -> Range:
    """The first clean -> reproduced change in release order (cannot-run releases skipped), and
    the first reproduced -> clean change after it."""
    ordered = sorted(results, key=lambda r: release_key(r.release))
    last_good, between = None, []
    for index, result in enumerate(ordered):
        if result.outcome == CANNOT_RUN:
            between.append(result.release)
        elif result.outcome == CLEAN:
            last_good, between = result.release, []
        else:
            fixed_in = next((r.release for r in ordered[index + 1 :] if r.outcome == CLEAN), None)
            return Range(last_good, result.release, tuple(between) if last_good else (), fixed_in)
    return Range(last_good, None)


def table(results: list[ReleaseResult], package: str) -> str:
    """The per-release table, markdown, in ascending release order."""
    lines = [f"| {package} | torch | transformers | result | seconds | verdict line / why |", "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: release_key(r.release)):
        why = r.why.replace("|", "\\|")
        lines.append(f"| {r.release} | {r.torch or '-'} | {r.transformers or '-'} | {r.outcome} | {r.seconds:.0f} | {why} |")
    return "\n".join(lines)


def replace_section(report: str, title: str, body: str) -> str:
    """`report` with the body of its section headed `title` (at any heading level: vLLM's bug
    template uses ###) replaced by `body`, up to the next heading of the same or a higher level;
    appended as a `## title` section if there is none."""
    lines = report.splitlines()
    level = lambda line: len(line) - len(line.lstrip("#")) if line.startswith("#") else 0
    start = next((i for i, line in enumerate(lines) if level(line) and line.lstrip("#").strip() == title), None)
    if start is None:
        return report.rstrip("\n") + f"\n\n## {title}\n\n{body.strip()}\n"
    end = next((i for i in range(start + 1, len(lines)) if 0 < level(lines[i]) <= level(lines[start])), len(lines))
    section = "\n".join(lines[: start + 1] + ["", body.strip()]) + "\n"
    rest = "\n".join(lines[end:])
    return section + ("\n" + rest.rstrip("\n") + "\n" if rest else "")


def run_repro(repro: Path, venv: releases.Venv, repro_args: list[str], timeout_s: float) -> ReleaseResult:
    """Run `repro` with the venv's python, isolated (-I) in an empty directory, as a stranger would."""
    versions = releases.installed_versions(venv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bisect-") as empty:
        try:
            done = subprocess.run(
                [str(venv.python), "-I", str(repro.resolve()), *repro_args], cwd=empty, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s,
            )
            outcome, why = parse_verdict(done.returncode, done.stdout)
        except subprocess.TimeoutExpired:
            outcome, why = CANNOT_RUN, f"timed out after {timeout_s:.0f} s"
    return ReleaseResult(venv.release, outcome, why, time.monotonic() - start,
                         versions.get("torch", ""), versions.get("transformers", ""))


def bisect(versions: list[str], run_release: Callable[[str], ReleaseResult],
           progress: Callable[[str, str], None] = lambda release, stage: None) -> list[ReleaseResult]:
    """Each release's result, in the order given; `run_release` installs and runs one."""
    results = []
    for release in versions:
        progress(release, "start")
        results.append(run_release(release))
        progress(release, results[-1].outcome)
    return results


def install_and_run(repro: Path, repro_args: list[str], timeout_s: float, status: Callable[[str], None]):
    def run_release(release: str) -> ReleaseResult:
        status(f"{release}: venv (cached, or installing: minutes)")
        start = time.monotonic()
        venv = releases.ensure_venv(release)
        if venv.error:
            return ReleaseResult(release, CANNOT_RUN, f"cannot install: {venv.error}", time.monotonic() - start)
        status(f"{release}: running {repro.name}")
        return run_repro(repro, venv, repro_args, timeout_s)

    return run_release


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    repro_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m rollout_lab.bisect", description=__doc__.splitlines()[0],
                                     epilog="Arguments after -- go to repro.py (e.g. -- --model DIR).")
    parser.add_argument("repro", type=Path, help="a repro.py (repro/<name>/repro.py)")
    parser.add_argument("--versions", required=True, help="comma-separated vLLM releases, e.g. 0.27.1,0.29.0,0.32.0")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per release run of the repro (default 900)")
    args = parser.parse_args(argv)
    if not args.repro.is_file():
        parser.error(f"{args.repro}: no such file (give a repro.py, e.g. repro/<name>/repro.py)")
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    if not versions:
        parser.error("--versions: give at least one release, e.g. 0.29.0,0.32.0")
    for release in versions:
        release_key(release)
    package = releases.package_for(releases.detect_device())

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task(f"bisect {args.repro}", total=len(versions))

        def progress(release: str, stage: str) -> None:
            if stage != "start":
                bar.advance(task)
                bar.console.print(f"{package} {release}: {stage}")

        run_release = install_and_run(args.repro, repro_args, args.timeout_s,
                                      lambda text: bar.update(task, description=f"bisect {args.repro.parent.name}: {text}"))
        results = bisect(versions, run_release, progress)
    text = table(results, package) + "\n\n" + regression_range(results).summary(results)
    print(text)
    report = args.repro.parent / "REPORT.md"
    command = f"`python -m rollout_lab.bisect {args.repro} --versions {','.join(versions)}`"
    body = f"{command}, on {time.strftime('%Y-%m-%d')}:\n\n{text}"
    report.write_text(replace_section(report.read_text() if report.is_file() else f"# {args.repro.parent.name}\n", SECTION, body))
    console.print(f"written into {report} (section {SECTION!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
