"""`python -m rollout_lab.localize <run_dir or case.json>`: name the first point inside the model where vLLM and the trainer part.

Replays the failing step (predicate.load_run's Case) on one fresh in-process engine, three times,
reset to a fresh engine's state in between (engine.reset):
  1. without the planted fault, capturing a spread of tokens: the clean level of each point;
  2. with it, sampling only: the worst flagged tokens (or --token pairs);
  3. with it, capturing those tokens at every point (capture.py);
then runs the same sequences through the transformers float32 model with the same hooks
(reference.py) and writes <run_dir>/localize/: LOCALIZE.md, localization.json, a PNG per token.
Exit status 0 when it localized, 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

# The fault-off replay's tokens that set the clean levels: completion positions (k: activations at
# prompt_len + k - 1; positions a request never reached are skipped) of CLEAN_REQUESTS requests
# spread over the step (one reference forward pass each).
CLEAN_POSITIONS = (0, 3, 7, 11, 15, 23, 31, 63, 127)
CLEAN_REQUESTS = 8


def parse_token(text: str) -> tuple[int, int]:
    request, sep, position = text.partition(":")
    if not sep or not request.isdigit() or not position.isdigit():
        raise argparse.ArgumentTypeError(f"--token {text!r}: expected REQUEST:POSITION (two integers, e.g. 12:37)")
    return int(request), int(position)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rollout_lab.localize", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run dir with flagged tokens, or a case.json (a hunt finding)")
    parser.add_argument("--tokens", type=int, default=5, help="how many of the worst flagged tokens to localize (default 5)")
    parser.add_argument("--token", type=parse_token, action="append", default=[],
                        help="REQUEST:POSITION (request index in the step, completion position); repeatable; replaces --tokens")
    parser.add_argument("--no-fault", action="store_true", help="replay without the planted fault: the clean control")
    parser.add_argument("--against", choices=("float32", "trainer"), default="float32",
                        help="float32: the float32 reference, clean levels from a fault-off replay (default); trainer: the "
                             "on-policy check, the trainer's own dtype and kernels (trainer.dtype, trainer.batch_invariant), "
                             "every token not bitwise equal is a failure and any difference at a point counts")
    parser.add_argument("--out", type=Path, help="output dir (default <run_dir>/localize, with --no-fault <run_dir>/localize_no_fault)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The capture reads the v1 model runner's persistent batch (capture.py).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from rollout_lab.config import ConfigError
    from rollout_lab.localize import report
    from rollout_lab.minimize.predicate import RunDirError, load_case, load_run
    from rollout_lab.models import ModelError

    try:
        if args.tokens < 1:
            raise ValueError(f"--tokens={args.tokens} must be at least 1")
        if args.against == "trainer" and args.run_dir.is_file():
            raise ValueError("--against trainer needs a run dir (its trainer's dtype and kernels), not a case file")
        run = (load_case(args.run_dir) if args.run_dir.is_file() else
               load_run(args.run_dir, threshold=0.0 if args.against == "trainer" else None))
        if run.expected.kind != "mismatch":
            raise ValueError(f"{args.run_dir} failed by a crash ({run.expected.crash_key}); localize explains silent mismatches")
    except (RunDirError, ConfigError, ModelError, ValueError) as exc:
        print(f"rollout_lab.localize: {exc}", file=sys.stderr)
        return 2
    default_dir = "localize_on_policy" if args.against == "trainer" else "localize_no_fault" if args.no_fault else report.DIR_NAME
    out_dir = args.out or (run.run_dir / default_dir)
    try:
        result = localize(run, args, out_dir)
    except ValueError as exc:
        print(f"rollout_lab.localize: {exc}", file=sys.stderr)
        return 2
    from rollout_lab.wandb_log import log_layer_curves

    path = report.write(result, out_dir)
    for line in result.summary():
        print(line)
    for warning in result.warnings:
        print(f"warning: {warning}")
    wandb_dir = log_layer_curves(run.config, out_dir, run.run_id, report.layer_curves(result), {"summary": "\n".join(result.summary())})
    print(f"localized {len(result.tokens)} tokens in {result.seconds:.0f} s (clean levels from {result.num_clean_tokens} tokens); "
          f"wrote {path}" + (f" and the W&B run {wandb_dir}" if wandb_dir else ""))
    return 0


def localize(run, args: argparse.Namespace, out_dir: Path):
    """The three replays and the reference; a report.Localization."""
    import torch
    from rich.progress import Progress

    from rollout_lab.instrument import SCHEDULE_LOG_ENV, ScheduleReader
    from rollout_lab.localize import capture
    from rollout_lab.localize.divergence import clean_levels, divergence, localize_token, request_facts, TokenLocalization
    from rollout_lab.localize.reference import points_of, reference_tokens
    from rollout_lab.localize.report import Localization
    from rollout_lab.minimize.standalone import run_case, sample, start_engine
    from rollout_lab.reference import load_reference
    from rollout_lab.trainer import build_model
    from rollout_lab import engine

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    schedule_path = out_dir / "schedule.jsonl"
    schedule_path.unlink(missing_ok=True)
    os.environ[SCHEDULE_LOG_ENV] = str(schedule_path)
    fault = None if args.no_fault else run.case.fault
    # Eager (hooks run), and the scheduler records for each token's blocks.
    case = replace(run.case, fault=fault, engine_args={
        **run.case.engine_args, "enforce_eager": True, "scheduler_cls": "rollout_lab.engine_hooks.RecordingScheduler"})
    threshold = run.expected.spike_threshold
    on_policy = args.against == "trainer"
    if on_policy:
        # The sampler's batch-invariant mode is read when vLLM is imported (sampler.py sets it the same way).
        os.environ["VLLM_BATCH_INVARIANT"] = "1" if run.config.engine.batch_invariant else "0"
    with Progress(transient=True) as progress:
        task = progress.add_task("starting the engine and the reference", total=6)
        # The float32 reference on the GPU when there is one: its per-layer hooks run one request at a
        # time, and a Mamba model without mamba_ssm's kernels scans in PyTorch, minutes per token on CPU.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reference = build_model(case.model, run.config.trainer).eval() if on_policy else load_reference(case.model, device)
        points = points_of(reference)
        llm = start_engine(case, with_fault=False)
        engine.remember_clean(llm)
        schedule = ScheduleReader(schedule_path)

        def captured_replay(wanted: list[tuple[int, int]], with_fault: bool):
            engine.reset(llm)
            if with_fault and fault is not None:
                engine.install_fault(llm, case.fault, case.fault_params)
            schedule.read_new()  # what earlier replays scheduled
            llm.collective_rpc(capture.install, args=(points, wanted))
            try:
                outputs = sample(llm, case)
            finally:
                tokens = llm.collective_rpc(capture.collect)[0]  # one worker (no tensor parallelism)
            return outputs, tokens, schedule.read_new()

        def sequences_of(outputs) -> dict[int, list[int]]:
            return {i: out.prompt_token_ids + out.token_ids for i, out in enumerate(outputs)}

        def divergences(vllm_tokens, outputs) -> dict[tuple[int, int], tuple[list[float], "torch.Tensor"]]:
            """(request, input position) -> (divergence per point, the reference's logits row)."""
            keys = [capture.row_key(p) for p in points]
            # A token some point missed (its position was not its request's last row, so no logits) is left out.
            whole = [v for v in vllm_tokens if all(k in v.rows for k in keys)]
            refs = {(r.request, r.input_position): r.rows for r in
                    reference_tokens(reference, points, sequences_of(outputs), [(t.request, t.input_position) for t in whole])}
            return {(v.request, v.input_position): ([divergence(v.rows[k], refs[v.request, v.input_position][k]) for k in keys],
                                                    refs[v.request, v.input_position]["logits"]) for v in whole}

        try:
            if on_policy:  # bitwise: the clean level of every point is 0, no fault-off replay needed
                clean, levels = [], [0.0] * len(points)
                progress.update(task, advance=2)
            else:
                progress.update(task, advance=1, description="fault-off replay: clean levels")
                spread = sorted({i * len(case.requests) // CLEAN_REQUESTS for i in range(CLEAN_REQUESTS)})
                clean_wanted = [(i, len(case.requests[i].prompt_token_ids) - 1 + k) for i in spread for k in CLEAN_POSITIONS]
                clean_outputs, clean_tokens, _ = captured_replay(clean_wanted, with_fault=False)
                progress.update(task, advance=1, description="reference on the clean tokens")
                clean = [values for values, _ in divergences(clean_tokens, clean_outputs).values()]
                levels = clean_levels(clean, len(points))

            progress.update(task, advance=1, description="replay: the worst tokens")
            engine.reset(llm)
            if fault is not None:
                engine.install_fault(llm, case.fault, case.fault_params)
            outcome = run_case(llm, reference, case, run.expected, worst=10**9)
            if outcome.crash_key is not None:
                raise ValueError(f"the replay crashed: {outcome.describe()}")
            chosen = choose(outcome.worst, args.token, args.tokens, threshold)
            wanted = [(d.request, len(case.requests[d.request].prompt_token_ids) + d.position - 1) for d in chosen]

            progress.update(task, advance=1, description=f"replay capturing {len(wanted)} tokens")
            outputs, vllm_tokens, log = captured_replay(wanted, with_fault=True)
            progress.update(task, advance=1, description="reference on the captured tokens")
            by_key = divergences(vllm_tokens, outputs)
        finally:
            llm.llm_engine.engine_core.shutdown()
        progress.update(task, advance=1)

    warnings, tokens = [], []
    for d in chosen:
        prompt_len = len(case.requests[d.request].prompt_token_ids)
        key = (d.request, prompt_len + d.position - 1)
        out = outputs[d.request]
        if key not in by_key or d.position >= len(out.token_ids):
            warnings.append(f"request {d.request} position {d.position} was not computed in the capture replay")
            continue
        token_id = out.token_ids[d.position]
        if token_id != d.token_id:
            warnings.append(f"request {d.request} position {d.position}: the capture replay sampled token {token_id}, the selecting one {d.token_id}")
        values, ref_logits = by_key[key]
        ref_logprob = float(torch.log_softmax(ref_logits.double(), -1)[token_id])
        abs_diff = abs(out.logprobs[d.position] - ref_logprob)
        facts = request_facts(log, str(d.request), prompt_len, d.position, len(out.token_ids),
                              out.num_preemptions, out.num_cached_tokens)
        tokens.append(localize_token(TokenLocalization(d.request, d.position, key[1], token_id, abs_diff, abs_diff > threshold,
                                                       values, facts), levels))
    return Localization(str(run.run_dir), case.model, fault, run.description, points, levels, len(clean), tokens,
                        round(time.perf_counter() - started, 1), warnings)


def choose(diffs, pairs: list[tuple[int, int]], count: int, threshold: float):
    """The tokens to localize: the given (request, position) pairs, else the `count` worst flagged ones
    and each of their requests' first flagged token; with nothing flagged, the `count` worst."""
    if pairs:
        by_pair = {(d.request, d.position): d for d in diffs}
        missing = [p for p in pairs if p not in by_pair]
        if missing:
            raise ValueError(f"--token {missing[0][0]}:{missing[0][1]}: the replay has no such token (request index in the step, completion position)")
        return [by_pair[p] for p in pairs]
    ranked = sorted(diffs, key=lambda d: -d.abs_diff)
    flagged = [d for d in ranked if d.abs_diff > threshold]
    if not flagged:
        return ranked[:count]
    worst = flagged[:count]
    firsts = {}
    for d in sorted(flagged, key=lambda d: d.position):
        firsts.setdefault(d.request, d)
    extra = [firsts[r] for r in dict.fromkeys(d.request for d in worst) if firsts[r] not in worst]
    return sorted(worst + extra, key=lambda d: (d.request, d.position))


if __name__ == "__main__":
    sys.exit(main())
