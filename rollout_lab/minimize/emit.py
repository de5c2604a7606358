"""The products: repro/<name>/repro.py, REPORT.md (vLLM's bug template) and MINIMIZATION.md.

    Reduction -> spec() -> script.repro_source -> repro.py -> run_isolated (a fresh interpreter
        without rollout_lab) -> confirm (walk back the accepted reductions when the minimal case
        does not fail in a fresh process) -> flips (each trigger knob undone, measured) -> report()
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from rich.markup import escape

from rollout_lab.localize.report import where_inside
from rollout_lab.minimize import standalone
from rollout_lab.minimize.reduce import (KNOB_ARGS, POOL_HEAD, Reduction, Size, case_knobs, knob_args, knob_text,
                                         prompt_indices, with_knobs, with_merged_prompts)
from rollout_lab.minimize.script import RANDOM_MODELS, ReproSpec, distinct_prompts, repro_source
from rollout_lab.minimize.standalone import Case
from rollout_lab.tolerances import clean_agreement

# Exit status of run_isolated when rollout_lab was importable after all (not a standalone run).
NOT_ISOLATED = 3
# The minimization log (stages, every trial) goes here, beside REPORT.md.
LOG_NAME = "MINIMIZATION.md"
# The environment variables "What makes it go away" flips: the switches (repro.py's ENV overrides
# what the verifying process inherits, so a switch is flipped, never unset).
FLIPPED = {"1": "0", "0": "1"}
WHERE = {
    "preempted": "requests that were preempted and resumed",
    "prefix_cached": "requests with prefix-cache hits",
    "any": "ordinary requests",
}


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
    output_tail: str
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


def env_assignments(env: dict[str, str]) -> str:
    """vLLM's environment variables as a shell would set them."""
    return " ".join(f"{k}={v}" for k, v in sorted(env.items()))


def title(reduction: Reduction, case: Case, device: str) -> str:
    """A title a person would write: what goes wrong, under which settings, on which device."""
    expected, outcome = reduction.run.expected, reduction.final_outcome()
    knobs = knob_text(case, case_knobs(case, reduction.targets))
    under = f" with {knobs}" if knobs else ""
    if expected.kind == "crash":
        exc_type = expected.crash_key.split("@", 1)[0]
        site = expected.crash_key.split("|")[-1].rsplit(":", 1)[-1]
        message = f": {outcome.crash_message}" if outcome is not None and outcome.crash_message else ""
        what = f"generate raises {exc_type}{message[:80]} in {site}"
    elif expected.kind == "batch_invariance":
        what = "a request's sampled tokens and logprobs change with the batch it runs in" + (
            f" under {env_assignments(case.env)}" if case.env else "")
    else:
        what = f"sampled-token logprobs disagree with transformers on {WHERE[expected.request_class]}"
    fault = f" (planted fault {case.fault}, not vLLM as shipped)" if case.fault else ""
    return f"[Bug]: {what}{under} ({device}){fault}"


def description(reduction: Reduction, case: Case) -> str:
    """Two or three plain sentences: the minimal workload, and what goes wrong with it."""
    expected, outcome = reduction.run.expected, reduction.final_outcome()
    size = Size.of(case, reduction.targets)
    knobs = knob_text(case, size.knobs) or "vLLM's defaults for the engine knobs"
    workload = (f"{size.requests} request(s) on {size.prompts} prompt(s) of up to {size.prompt_tokens} tokens, "
                f"max_tokens={case.max_tokens}, " + ("sampled from the engine's seeded RNG" if any(
                    r.seed is None for r in case.requests) else "each with its own seed"))
    if expected.kind == "crash":
        happened = f"llm.generate raises {expected.crash_key.split('@', 1)[0]}"
        if outcome is not None:
            happened += f" ({outcome.crash_message})"
    elif expected.kind == "batch_invariance":
        happened = ("a request run again alone on the same engine, after the whole batch, returns other sampled tokens "
                    "or sampled-token logprobs (compared bitwise) than it did inside the batch")
        if outcome is not None:
            happened += f": {outcome.describe()}"
        if case.env:
            workload += f", with {env_assignments(case.env)}"
    else:
        happened = ("the logprob vLLM returns for some sampled tokens differs from transformers' float32 "
                    f"teacher-forced logprob by more than {expected.spike_threshold:g} "
                    f"({clean_agreement(str(case.engine_args.get('dtype')), case.engine_args.get('kv_cache_dtype'))}), "
                    f"on {WHERE[expected.request_class]}")
        if outcome is not None:
            happened += f": {outcome.num_flagged}/{outcome.num_tokens} tokens, max difference {outcome.max_abs_diff:.3g}"
    return f"With {knobs} and {workload}, {happened}."


def spec(reduction: Reduction, case: Case, tokenizer, device: str) -> ReproSpec:
    """What repro.py states for `case` (the minimal one, or one reduction back)."""
    return ReproSpec(
        title=title(reduction, case, device),
        description=description(reduction, case),
        model_name=reduction.run.config.model.name,
        case=case,
        expected=reduction.run.expected,
        prompt_texts=[tokenizer.decode(p) for p in distinct_prompts(case)] if tokenizer is not None else None,
    )


def run_isolated(script: Path, args: tuple[str, ...] = (), timeout: float = 600) -> Verification:
    """Run `script` in a fresh interpreter that has this environment's site-packages but not rollout_lab.

    -I -S: no PYTHON* variables, no script or current directory on sys.path, and no .pth files
    (rollout_lab's editable install is one); the site-packages directories are put on sys.path
    by hand, and the run stops with status NOT_ISOLATED if rollout_lab is importable anyway.
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
    with tempfile.TemporaryDirectory() as cwd:
        try:
            done = subprocess.run([sys.executable, "-I", "-S", "-c", bootstrap], cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
            returncode, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as exc:
            # TimeoutExpired keeps bytes even in text mode.
            partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            returncode, output = -1, f"{partial}\ntimed out after {timeout} s"
    verdicts = [m.group(0) for m in VERDICT_LINE.finditer(output)]
    return Verification(list(args), returncode, time.perf_counter() - started, output[-6000:], verdicts[-1] if verdicts else "")


def collect_env() -> str:
    """`python -m vllm.collect_env`, vLLM's own environment report; today's short list where it has none."""
    try:
        done = subprocess.run([sys.executable, "-m", "vllm.collect_env"], capture_output=True, text=True, timeout=300)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "\n".join(f"{key}: {value}" for key, value in standalone.environment().items())


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


def lab_args(reduction: Reduction, case: Case) -> tuple[str, ...]:
    """The arguments repro.py needs to run on this lab's model: `--model <the lab's copy>` unless the
    script rebuilds the model itself (smollm2's hub weights differ from the lab's copy)."""
    return () if reduction.run.config.model.name in RANDOM_MODELS else ("--model", case.model)


class Emitter:
    """Writes repro.py for a case of the reduction and runs it in fresh interpreters."""

    def __init__(self, reduction: Reduction, out_dir: Path, tokenizer, device: str, console=None):
        self.reduction, self.out_dir, self.tokenizer, self.device = reduction, out_dir, tokenizer, device
        self.console = console

    def source(self, case: Case) -> str:
        return repro_source(spec(self.reduction, case, self.tokenizer, self.device))

    def run(self, case: Case, args: tuple[str, ...] = ()) -> Verification:
        """repro.py of `case` in a fresh interpreter (written beside the real one, then removed).

        A model the script does not rebuild is given as the lab's own copy (lab_args).
        """
        args = (*lab_args(self.reduction, case), *args)
        with tempfile.TemporaryDirectory(dir=self.out_dir) as tmp:
            script = Path(tmp) / "repro.py"
            script.write_text(self.source(case))
            done = run_isolated(script, args)
        self._say(f"fresh process, {Size.of(case, self.reduction.targets).describe()} {' '.join(args)}: {done.describe()}")
        return done

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(f"[bold]verify[/] {escape(text)}", highlight=False)

    def confirm(self) -> Confirmation:
        """The minimal case in a fresh process; when it does not fail there, the smallest accepted
        reduction that does (bisecting the chain original -> minimal, assuming larger cases fail)."""
        chain = self.reduction.accepted()
        last = self.run(chain[-1])
        # CANNOT RUN says nothing about the engine's history (no model, no memory): no walk back.
        if last.verdict != "NOT REPRODUCED" or len(chain) == 1:
            return Confirmation(chain[-1], last, [])
        walked = [(Size.of(chain[-1], self.reduction.targets).describe(), last.verdict)]
        warm = self.warmup(chain[0], chain[-1], walked)
        if warm is not None:
            return Confirmation(warm[0], warm[1], walked)
        best: Optional[tuple[int, Verification]] = None
        lo, hi = 0, len(chain) - 1  # chain[hi] does not fail fresh
        while lo < hi:
            mid = (lo + hi) // 2
            done = self.run(chain[mid])
            walked.append((Size.of(chain[mid], self.reduction.targets).describe(), done.verdict))
            if done.verdict == "REPRODUCED":
                best, lo = (mid, done), mid + 1
            else:
                hi = mid
        if best is None:  # no accepted reduction fails in a fresh process
            return Confirmation(chain[-1], last, walked)
        return Confirmation(chain[best[0]], best[1], walked, len(chain) - 1 - best[0])

    def warmup(self, original: Case, minimal: Case, walked: list[tuple[str, str]]) -> Optional[tuple[Case, Verification]]:
        """The minimal case behind the smallest part of the engine's history it needs, each candidate in a
        fresh process: the original case's requests as a warm-up, merged into one prompt if that still fails,
        then halved while a half still fails. None when even the whole original as a warm-up does not fail."""
        def tried(requests: list) -> Optional[tuple[Case, Verification]]:
            candidate = replace(minimal, warmup=requests, warmup_max_tokens=original.max_tokens)
            done = self.run(candidate)
            walked.append((f"{Size.of(minimal, self.reduction.targets).describe()}, after a warm-up of {len(requests)} "
                           f"requests x {original.max_tokens} tokens", done.verdict))
            return (candidate, done) if done.verdict == "REPRODUCED" else None

        best = tried(original.requests)
        if best is None:
            return None
        merged = tried(with_merged_prompts(original, 1).requests) if len(prompt_indices(original)) > 1 else None
        best = merged or best
        requests = best[0].warmup
        while len(requests) > 1:
            half = len(requests) // 2
            smaller = tried(requests[:half]) or tried(requests[half:])
            if smaller is None:
                break
            best, requests = smaller, smaller[0].warmup
        return best

    def flips(self, case: Case) -> list[Flip]:
        """Each knob of the trigger back to its default (a boolean one flipped), and the planted fault off."""
        runs = self.reduction.rule.tries
        flips = []
        knobs = case_knobs(case, self.reduction.targets)
        for knob in knobs:
            if knob == POOL_HEAD:  # the free queue left as a fresh engine's: the lowest ids first
                flips.append(Flip(f"{POOL_HEAD}=None", [self.run(replace(case, block_pool_head=None)).verdict for _ in range(runs)]))
                continue
            args = with_knobs(case.engine_args, [k for k in knobs if k != knob], self.reduction.targets)
            for name in knob_args(knob):
                if isinstance(case.engine_args.get(name), bool):
                    args[name] = not case.engine_args[name]
            changed = {n: args.get(n, "default") for n in knob_args(knob) if args.get(n) != case.engine_args.get(n)}
            label = ", ".join(f"{n}={v}" for n, v in changed.items())
            flips.append(Flip(label, [self.run(replace(case, engine_args=args)).verdict for _ in range(runs)]))
        # vLLM's environment variables are no knobs of the reduction (one process holds one env):
        # each is flipped here, where every run is a fresh process.
        for name, value in sorted(case.env.items()):
            if value in FLIPPED:
                env = case.env | {name: FLIPPED[value]}
                flips.append(Flip(f"{name}={env[name]}", [self.run(replace(case, env=env)).verdict for _ in range(runs)]))
        if case.fault:
            flips.append(Flip("planted fault off (--no-fault)", [self.run(case, ("--no-fault",)).verdict for _ in range(runs)], True))
        return flips


def where_it_fails(reduction: Reduction, case: Case) -> list[str]:
    """Which requests fail in the minimal case, and where the run's flagged tokens sat in the caches."""
    outcome, lines = reduction.outcome_of(case), []
    if reduction.run.expected.kind == "crash":
        if outcome is not None:
            lines.append(f"- The crash: `{outcome.crash_message}` (key `{reduction.run.expected.crash_key}`).")
    elif reduction.run.expected.kind == "batch_invariance":
        if outcome is not None:
            text = (f"- Minimal case: target requests {outcome.differing} of the first {outcome.targets} differ; "
                    f"{outcome.num_flagged}/{outcome.num_tokens} compared positions hold the same token with another logprob")
            if outcome.worst:
                text += f", worst {outcome.worst[0].abs_diff:.3g} (request {outcome.worst[0].request}, position {outcome.worst[0].position})"
            if outcome.first_token_diff is not None:
                text += f"; first other token at position {outcome.first_token_diff}"
            lines.append(text + ".")
    elif outcome is not None and outcome.worst:
        bad = [d for d in outcome.worst if d.abs_diff > reduction.run.expected.spike_threshold]
        requests = sorted({d.request for d in bad})
        first = min(bad, key=lambda d: d.position)
        lines.append(
            f"- Minimal case: {outcome.num_flagged}/{outcome.num_tokens} sampled tokens flagged, on requests "
            f"{requests} of {outcome.num_requests} ({outcome.num_preempted_requests} preempted); first bad position "
            f"{first.position} (request {first.request}: {first.num_preemptions} preemptions, "
            f"{first.num_cached_tokens} prefix-cached tokens); max |diff| {outcome.max_abs_diff:.3g}.")
    placement = reduction.run.placement
    if placement:
        lines.append(f"- In the original run (scheduling records): {placement}.")
    if reduction.run.expected.kind == "mismatch":
        lines += where_inside(reduction.run.run_dir)
    return lines


def _log_summary(reduction: Reduction) -> list[str]:
    # "did not run": the candidate's engine did not start (kept out like a pass, but no evidence either way).
    rows = ["| stage | runs | failed | did not run | seconds | last change |", "| --- | --- | --- | --- | --- | --- |"]
    stages: dict[str, list] = {}
    for record in reduction.records:
        stages.setdefault(record.stage, []).append(record)
    for stage, records in stages.items():
        not_run = sum(not r.failed and r.result().at_start for r in records)
        rows.append(
            f"| {stage} | {len(records)} | {sum(r.failed for r in records)} | {not_run} | "
            f"{sum(r.seconds for r in records):.0f} | {records[-1].change} |"
        )
    return rows


def minimization_log(reduction: Reduction, confirmation: Optional[Confirmation]) -> str:
    """MINIMIZATION.md: how the case was found, stage by stage."""
    run, expected = reduction.run, reduction.run.expected
    lines = [
        f"# How `{run.run_id}` was minimized", "",
        f"`python -m rollout_lab.minimize {run.run_dir}`; every trial is a line of `reduction.jsonl`.", "",
        f"- Run failure: {run.description}.",
        f"- Predicate (\"the same failure\"): {expected.describe()}.",
        f"- Flakiness rule: {reduction.rule.describe()}.",
        "- Dropped from the run: Ray and the workers (one `vllm.LLM`), the trainer (a transformers float32 "
        f"forward pass), the RL steps (step {run.step} of {run.config.loop.steps} with the run's initial, fixed "
        "weights), rollout_lab's scheduler hook and worker extension.",
        f"- Before: {reduction.before.describe()}.",
        f"- After: {reduction.after.describe()}.",
        "- Knob defaults: " + "; ".join([f"{knob} -> {reduction.targets[knob] or 'vLLM default'}" for knob in KNOB_ARGS] + (
            [f"{POOL_HEAD} -> None (the free block queue as a fresh engine's)"] if run.case.block_pool_head is not None else [])) + ".",
        f"- Runs: {len(reduction.records)} ({reduction.new_trials} in the last session), "
        f"{sum(r.seconds for r in reduction.records):.0f} s of trials; last session {reduction.seconds:.0f} s wall.",
        "", *_log_summary(reduction),
    ]
    if confirmation is not None and confirmation.walked_back:
        lines += ["", "## Fresh-process confirmation", "",
                  *[f"- {size}: {verdict}" for size, verdict in confirmation.walked_back]]
    return "\n".join(lines) + "\n"


def report(reduction: Reduction, source: str, env_text: str, confirmation: Optional[Confirmation],
           flips: list[Flip], device: str, repro_path: str) -> str:
    """REPORT.md in the shape of vLLM's bug template (the repro inline; the log in MINIMIZATION.md)."""
    case = confirmation.case if confirmation is not None else reduction.case
    lines = [f"# {title(reduction, case, device)}", ""]
    if case.fault:
        lines += [f"> **Not a vLLM bug as shipped**: this needs rollout_lab's planted fault `{case.fault}` "
                  f"({json.dumps(case.fault_params, sort_keys=True)}), which repro.py carries (labelled) and installs; "
                  "`--no-fault` runs vLLM as shipped.", ""]
    lines += ["### Your current environment", "", "<details>", "<summary>The output of <code>python -m vllm.collect_env</code></summary>",
              "", "```text", env_text, "```", "</details>", "",
              "### 🐛 Describe the bug", "", textwrap.fill(description(reduction, case), 100), ""]
    if confirmation is not None and confirmation.steps_back:
        lines += [textwrap.fill(
            f"The failure depends on the engine's history: the minimal case failed in the minimizer's long-lived engine "
            f"process but not in a fresh one, so this repro is the smallest accepted reduction that does fail fresh "
            f"({confirmation.steps_back} reduction(s) before the minimal one; {LOG_NAME} lists each one tried).", 100), ""]
    if case.warmup:
        lines += [textwrap.fill(
            f"The failure depends on the engine's history: the case passes on a fresh engine and fails once the same "
            f"engine has served {len(case.warmup)} earlier request(s) of {case.warmup_max_tokens} tokens (WARMUP, which "
            f"repro.py runs first; {LOG_NAME} lists each warm-up tried in a fresh process).", 100), ""]
    if reduction.class_note:
        lines += [textwrap.fill(f"Request class: {reduction.class_note}.", 100), ""]
    lines += ["```python", source.rstrip("\n"), "```", ""]
    if confirmation is not None:
        run_line = " ".join(["python repro.py", *confirmation.verification.args])
        lines += [f"Its output (`{run_line}`, a fresh interpreter; last lines):", "", "```text",
                  *confirmation.verification.output_tail.strip().splitlines()[-8:], "```", ""]
    lines += ["### What makes it go away", ""]
    if confirmation is None:
        lines.append("- (not measured: --no-verify)")
    elif reduction.budget_spent:
        lines.append("- (not measured: the minimization budget, --budget-s, was spent)")
    else:
        lines += [f"- {f.describe()}" for f in flips] or ["- every engine knob is at vLLM's default already"]
    lines += ["", "### Where it fails", "", *where_it_fails(reduction, case), "",
              "### Regression range", "",
              f"(run `python -m rollout_lab.bisect {repro_path} --versions ...`)", "",
              f"Minimization log: [{LOG_NAME}]({LOG_NAME}).", ""]
    return "\n".join(lines)


def write(reduction: Reduction, out_dir: Path, verify: bool, console=None, flip: bool = True) -> tuple[Optional[Confirmation], list[Flip]]:
    """repro.py, REPORT.md and MINIMIZATION.md into out_dir; with verify, the case confirmed in a fresh process first
    (and, with flip, each knob of its trigger undone)."""
    from transformers import AutoTokenizer

    import torch

    device = "GPU" if torch.cuda.is_available() else "CPU"
    emitter = Emitter(reduction, out_dir, AutoTokenizer.from_pretrained(reduction.case.model), device, console)
    confirmation = emitter.confirm() if verify else None
    case = confirmation.case if confirmation is not None else reduction.case
    source = emitter.source(case)
    (out_dir / "repro.py").write_text(source)
    # A case the budget left unreduced may hold every knob of the run: flipping each would cost as much again.
    flips = emitter.flips(case) if verify and flip and not reduction.budget_spent else []
    (out_dir / "REPORT.md").write_text(report(reduction, source, collect_env(), confirmation, flips, device, str(out_dir / "repro.py")))
    (out_dir / LOG_NAME).write_text(minimization_log(reduction, confirmation))
    return confirmation, flips
