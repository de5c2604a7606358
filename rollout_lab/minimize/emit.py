"""The products: repro/<name>/repro.py, REPORT.md (vLLM's bug template) and MINIMIZATION.md.

    Reduction -> spec() -> script.repro_source -> repro.py -> fresh.run_isolated (a fresh interpreter
        without rollout_lab) -> confirm (walk back the accepted reductions when the minimal case
        does not fail in a fresh process) -> flips (each trigger knob undone, measured) -> report_text.report()
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

from rich.markup import escape

from rollout_lab.minimize import bug_report, standalone
from rollout_lab.minimize.fresh import Confirmation, Flip, Verification, run_isolated
from rollout_lab.minimize.knobs import POOL_HEAD, case_knobs, knob_args, with_knobs
from rollout_lab.minimize.reduce import Reduction, Size, prompt_indices, with_merged_prompts
from rollout_lab.minimize.report_text import LOG_NAME, description, minimization_log, report, title, upstream_query
from rollout_lab.minimize.script import RANDOM_MODELS, ReproSpec, distinct_prompts, repro_source
from rollout_lab.minimize.standalone import Case

# The environment variables "What makes it go away" flips: the switches (repro.py's ENV overrides
# what the verifying process inherits, so a switch is flipped, never unset).
FLIPPED = {"1": "0", "0": "1"}


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


def collect_env() -> str:
    """`python -m vllm.collect_env`, vLLM's own environment report; today's short list where it has none."""
    try:
        done = subprocess.run([sys.executable, "-m", "vllm.collect_env"], capture_output=True, text=True, timeout=300)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "\n".join(f"{key}: {value}" for key, value in standalone.environment().items())


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
