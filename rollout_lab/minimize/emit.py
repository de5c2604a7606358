"""The products: repro/<name>/repro.py, REPORT.md (vLLM's bug template) and MINIMIZATION.md.

    Reduction -> spec() -> script.repro_source -> repro.py -> run_isolated (a fresh interpreter
        without rollout_lab) -> confirm (walk back the accepted reductions when the minimal case
        does not fail in a fresh process) -> flips (each trigger knob undone, measured) -> report()
"""
from __future__ import annotations

import json
import os
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
from rollout_lab.minimize import bug_report, standalone
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

# The same, in a title's few words.
SHORT_WHERE = {"preempted": "preempted requests", "prefix_cached": "prefix-cache hits", "any": "ordinary requests"}


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


def env_assignments(env: dict[str, str]) -> str:
    """vLLM's environment variables as a shell would set them."""
    return " ".join(f"{k}={v}" for k, v in sorted(env.items()))


def title(reduction: Reduction, case: Case, device: str) -> str:
    """A title a person would write, at most bug_report.MAX_TITLE characters: the symptom, the trigger knobs
    (names only; their values are in the script), the device."""
    expected = reduction.run.expected
    values = {POOL_HEAD: case.block_pool_head, **case.engine_args}
    knobs = [n for knob in case_knobs(case, reduction.targets) for n in knob_args(knob) if n in values]
    fault = " [planted fault]" if case.fault else ""
    if expected.kind == "crash":
        exc_type, site = expected.crash_key.split("@", 1)[0], _crash_function(expected)
        if expected.at_start:
            what = f"engine start raises {exc_type}" + (f" in {site}" if site else "")
        else:
            what = f"{exc_type} in {site or 'generate'}"
    elif expected.kind == "batch_invariance":
        env = " ".join(f"{k}={v}" for k, v in sorted(case.env.items()))
        what = f"{env}: logprobs depend on the batch" if env else "a request's logprobs depend on its batch"
    else:
        what = f"logprobs off transformers' on {SHORT_WHERE[expected.request_class]}"
    # The trigger knobs with their values if they fit, else their names, else as many names as fit.
    candidates = [", ".join(f"{n}={values[n]}" for n in knobs)] + [
        ", ".join(knobs[:count]) + (" ..." if count < len(knobs) else "") for count in range(len(knobs), 0, -1)]
    for under in candidates if knobs else [""]:
        text = f"{bug_report.TITLE_PREFIX}{what}{' with ' + under if under else ''} ({device}){fault}"
        if len(text) <= bug_report.MAX_TITLE:
            return text
    text = f"{bug_report.TITLE_PREFIX}{what} ({device}){fault}"
    return text if len(text) <= bug_report.MAX_TITLE else text[: bug_report.MAX_TITLE - 3] + "..."


def _crash_function(expected) -> str:
    """The innermost vLLM function of a crash key ("" when the crash had no vLLM frame)."""
    frames = expected.crash_key.split("@", 1)[1]
    return "" if frames == "no-vllm-frame" else frames.split("|")[-1].rsplit(":", 1)[-1]


def description(reduction: Reduction, case: Case) -> str:
    """Two or three plain sentences: the minimal workload, and what goes wrong with it."""
    expected, outcome = reduction.run.expected, reduction.final_outcome()
    size = Size.of(case, reduction.targets)
    knobs = knob_text(case, size.knobs) or "vLLM's defaults for the engine knobs"
    workload = (f"{size.requests} request(s) on {size.prompts} prompt(s) of up to {size.prompt_tokens} tokens, "
                f"max_tokens={case.max_tokens}, " + ("sampled from the engine's seeded RNG" if any(
                    r.seed is None for r in case.requests) else "each with its own seed"))
    if expected.kind == "crash":
        happened = f"{'vllm.LLM (the engine start)' if expected.at_start else 'llm.generate'} raises {expected.crash_key.split('@', 1)[0]}"
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


def expected_actual(reduction: Reduction, case: Case) -> tuple[str, str]:
    """("Expected", "Actual"), a line each."""
    expected, outcome = reduction.run.expected, reduction.outcome_of(case)
    if expected.kind == "crash":
        message = f": {outcome.crash_message}" if outcome is not None and outcome.crash_message else ""
        where = _crash_function(expected)
        return (f"`llm.generate` returns the {len(case.requests)} completion(s).",
                f"it raises `{expected.crash_key.split('@', 1)[0]}{message}`" + (f" in `{where}`." if where else "."))
    if expected.kind == "batch_invariance":
        return ("each target request gives bitwise the same tokens and logprobs alone as inside the batch "
                "(vLLM's batch-invariance promise).", (outcome.describe() if outcome is not None else "they differ") + ".")
    agreement = clean_agreement(str(case.engine_args.get("dtype")), case.engine_args.get("kv_cache_dtype"))
    return (f"every sampled token's logprob within {expected.spike_threshold:g} of transformers' float32 one ({agreement}).",
            (outcome.describe() if outcome is not None else "some are further off") + ".")


def upstream_query(reduction: Reduction, case: Case) -> str:
    """What to search vLLM's issues for: the exception and its function, or the symptom, and the trigger knobs."""
    expected = reduction.run.expected
    knobs = tuple(name for knob in case_knobs(case, reduction.targets) for name in knob_args(knob))[:2]
    if expected.kind == "crash":
        return bug_report.search_query(expected.crash_key.split("@", 1)[0], _crash_function(expected), knobs)
    if expected.kind == "batch_invariance":
        return bug_report.search_query("VLLM_BATCH_INVARIANT", "logprobs", tuple(sorted(set(case.env) - {"VLLM_BATCH_INVARIANT"})))
    return bug_report.search_query("logprobs", "mismatch", knobs)


def report(reduction: Reduction, source: str, env_text: str, confirmation: Optional[Confirmation],
           flips: list[Flip], device: str, repro_path: str, upstream: Optional[bug_report.Upstream] = None) -> str:
    """REPORT.md in vLLM's bug template (bug_report.BugReport words it; the log goes to MINIMIZATION.md)."""
    case = confirmation.case if confirmation is not None else reduction.case
    expected, actual = expected_actual(reduction, case)
    notes = [line[2:] for line in where_it_fails(reduction, case)]
    if case.fault:
        notes.insert(0, f"**Not a vLLM bug as shipped**: it needs rollout_lab's planted fault `{case.fault}` "
                        f"({json.dumps(case.fault_params, sort_keys=True)}), which repro.py carries (labelled); `--no-fault` runs vLLM as shipped.")
    if confirmation is not None and confirmation.steps_back:
        notes.append(f"The failure depends on the engine's history: the minimal case failed in the minimizer's long-lived "
                     f"engine but not in a fresh process, so this is the smallest accepted reduction that fails fresh "
                     f"({confirmation.steps_back} reduction(s) before the minimal one; {LOG_NAME} lists each one tried).")
    notes.append(f"How it was found and minimized: [{LOG_NAME}]({LOG_NAME}).")
    if case.warmup:
        notes.append(f"The failure depends on the engine's history: the case passes on a fresh engine and fails once the same "
                     f"engine has served {len(case.warmup)} earlier request(s) of {case.warmup_max_tokens} tokens (WARMUP, which "
                     f"repro.py runs first; {LOG_NAME} lists each warm-up tried in a fresh process).")
    if reduction.class_note:
        notes.append(f"Request class: {reduction.class_note}.")
    if confirmation is None:
        go_away, output = ["(not measured: --no-verify)"], "(not run: --no-verify)"
    else:
        output = confirmation.verification.output
        go_away = (["(not measured: the minimization budget, --budget-s, was spent)"] if reduction.budget_spent
                   else [f.describe() for f in flips] or ["every engine knob is at vLLM's default already"])
    command = " ".join(["python -I repro.py", *(confirmation.verification.args if confirmation is not None else [])])
    return bug_report.BugReport(
        title=title(reduction, case, device),
        environment=env_text,
        summary=textwrap.fill(description(reduction, case), 100),
        script=source,
        command=bug_report.relative_paths(command),
        expected=expected,
        actual=actual,
        output=output,
        go_away=go_away,
        release_range=f"Not bisected yet: `python -m rollout_lab.bisect {bug_report.relative_paths(repro_path)} --versions A,B,C`.",
        upstream=upstream or bug_report.Upstream(upstream_query(reduction, case), None, "not searched"),
        draft=("the minimization budget (--budget-s) ran out before the case was reduced; this is the case as far as "
               "it got, its knobs not flipped" if reduction.budget_spent else ""),
        notes=notes,
    ).render()


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
    upstream = bug_report.search_upstream(upstream_query(reduction, case))
    (out_dir / "REPORT.md").write_text(report(reduction, source, collect_env(), confirmation, flips, device,
                                              str(out_dir / "repro.py"), upstream))
    (out_dir / LOG_NAME).write_text(minimization_log(reduction, confirmation))
    return confirmation, flips
