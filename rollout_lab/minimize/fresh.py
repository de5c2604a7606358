"""A repro.py run in a fresh interpreter without rollout_lab, and what the runs found.

    repro.py -> run_isolated -> Verification (its verdict line and exit status agreeing)
    Verifications -> Confirmation (the case that fails fresh) and Flip (a knob of the trigger undone)
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rollout_lab.minimize.standalone import Case

# Exit status of run_isolated when rollout_lab was importable after all (not a standalone run).
NOT_ISOLATED = 3
# The verdict line every repro.py prints, and the exit status that goes with it. No other output
# counts: an uncaught traceback, a missing file, an argparse error all read as "cannot run".
VERDICT_EXITS = {"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}
VERDICT_LINE = re.compile(r"^(REPRODUCED|NOT REPRODUCED|CANNOT RUN): .*$", re.MULTILINE)


@dataclass
class Verification:
    """One run of a repro.py in a fresh interpreter without rollout_lab."""

    args: list[str]
    returncode: int
    seconds: float
    output: str
    # The last verdict line the script printed ("" when it printed none).
    verdict_line: str = ""

    @property
    def verdict(self) -> str:
        """REPRODUCED or NOT REPRODUCED when the verdict line and the exit status agree; else CANNOT RUN."""
        match = VERDICT_LINE.match(self.verdict_line)
        if match and VERDICT_EXITS[match.group(1)] == self.returncode:
            return match.group(1)
        return "CANNOT RUN"

    @property
    def status(self) -> int:
        """The verdict as an exit status: 1 reproduced, 0 not, 2 cannot run."""
        return VERDICT_EXITS[self.verdict]

    def describe(self) -> str:
        why = "" if self.verdict != "CANNOT RUN" or self.verdict_line.startswith("CANNOT RUN") else (
            f" (exit {self.returncode}, no verdict line)" if not self.verdict_line else f" (exit {self.returncode} after {self.verdict_line!r})")
        return f"{self.verdict_line or self.verdict}{why}, exit {self.returncode} in {self.seconds:.0f} s"


def run_isolated(script: Path, args: tuple[str, ...] = (), timeout: float = 600) -> Verification:
    """Run `script` in a fresh interpreter that has this environment's site-packages but not rollout_lab.

    -I -S: no PYTHON* variables, no script or current directory on sys.path, and no .pth files
    (rollout_lab's editable install is one); the site-packages directories are put on sys.path
    by hand, and the run stops with status NOT_ISOLATED if rollout_lab is importable anyway.
    HOME is an empty directory and ROLLOUT_LAB_CACHE names none: the lab's models are out of reach.
    """
    # Absolute: the interpreter starts in a temporary directory, where a relative path names nothing.
    script = Path(script).resolve()
    # This environment's packages, wherever they come from (site-packages, or PYTHONPATH as on a
    # machine with a --target install), less any directory holding rollout_lab (its checkout).
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    paths += [p for p in sys.path if p and Path(p).is_dir() and not (Path(p) / "rollout_lab").is_dir()]
    paths = list(dict.fromkeys(paths))
    bootstrap = (
        f"import sys\nsys.path.extend({paths!r})\n"
        "try:\n    import rollout_lab\nexcept ImportError:\n    pass\n"
        f"else:\n    print('rollout_lab is importable', file=sys.stderr)\n    sys.exit({NOT_ISOLATED})\n"
        f"sys.argv = {[str(script), *args]!r}\n"
        "import runpy\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryDirectory() as home:
        # As a maintainer runs it: an empty HOME (no ~/.cache/rollout_lab, no hub cache) and the lab's cache hidden.
        env = os.environ | {"HOME": home, "ROLLOUT_LAB_CACHE": str(Path(home) / "no-rollout-lab-cache")}
        try:
            done = subprocess.run([sys.executable, "-I", "-S", "-c", bootstrap], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
            returncode, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as exc:
            # TimeoutExpired keeps bytes even in text mode.
            partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            returncode, output = -1, f"{partial}\ntimed out after {timeout} s"
    verdicts = [m.group(0) for m in VERDICT_LINE.finditer(output)]
    return Verification(list(args), returncode, time.perf_counter() - started, output, verdicts[-1] if verdicts else "")


@dataclass
class Confirmation:
    """The emitted case run in a fresh process, and the walk back when it did not fail there."""

    case: Case
    verification: Verification
    # The accepted reductions tried in fresh processes before `case`, as (case size, verdict).
    walked_back: list[tuple[str, str]]
    # How many accepted reductions the emitted case is before the minimal one (0: the minimal case).
    steps_back: int = 0


@dataclass
class Flip:
    """One knob of the trigger undone, its repro run in fresh processes."""

    label: str
    verdicts: list[str]
    # The planted fault switched off (--no-fault), rather than an engine knob.
    fault_off: bool = False

    def describe(self) -> str:
        clean = self.verdicts.count("NOT REPRODUCED")
        if clean == len(self.verdicts):
            return f"{self.label}: clean {clean}/{len(self.verdicts)}"
        failed = self.verdicts.count("REPRODUCED")
        other = len(self.verdicts) - clean - failed
        return f"{self.label}: still fails {failed}/{len(self.verdicts)}" + (f" ({other} could not run)" if other else "")
