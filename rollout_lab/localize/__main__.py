"""`python -m rollout_lab.localize <run_dir or case.json>`: name the first point inside the model where vLLM and the trainer part.

Replays the failing step (predicate.load_run's Case) on one fresh in-process engine, twice, reset to
a fresh engine's state in between (engine.reset), as the run ran it (its planted fault, if any, on;
a bug from outside the lab has no off switch, so none is assumed; a minimized history-dependent
case's warm-up first, each time):
  1. sampling only: the worst flagged tokens (or --token pairs); nothing flagged: nothing to localize;
  2. capturing those tokens and a spread of others at every point (capture.py);
then runs the same sequences through the transformers float32 model with the same hooks
(reference.py). The clean level of a point comes from the spread's clean tokens (unflagged, no
jump) and a stored clean profile (profile.py); the shape rule names the first point whose
divergence jumps orders of magnitude above every earlier one (divergence.py). Writes
<run_dir>/localize/: LOCALIZE.md, localization.json, a PNG per token.
Exit status 0 when it localized, 2 on bad input or nothing to localize.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

# The capture replay's spread of tokens that may set the clean levels: completion positions (k:
# activations at prompt_len + k - 1; positions a request never reached are skipped) of
# CLEAN_REQUESTS requests spread over the step (one reference forward pass each), plus the localized
# tokens' own input positions on those requests (position-matched).
CLEAN_POSITIONS = (0, 3, 7, 11, 15, 23, 31, 63, 127)
CLEAN_REQUESTS = 8


class NothingToLocalize(ValueError):
    """The replay flagged no token: there is no failure to place."""


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
    parser.add_argument("--no-fault", action="store_true",
                        help="replay without the lab's planted fault (a run with one): the clean control; it localizes the worst tokens anyway")
    parser.add_argument("--store-profile", action="store_true",
                        help="store the replay's clean tokens as the clean profile of this model, device, vLLM release and dtype "
                             "(<cache>/clean_profiles.json); takes a clean run dir too")
    parser.add_argument("--against", choices=("float32", "trainer"), default="float32",
                        help="float32: the float32 reference, clean levels from clean tokens and the shape rule (default); trainer: the "
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
        if args.store_profile and (args.against == "trainer" or args.run_dir.is_file()):
            raise ValueError("--store-profile takes a run dir and the float32 reference")
        run = (load_case(args.run_dir) if args.run_dir.is_file() else
               load_run(args.run_dir, threshold=0.0 if args.against == "trainer" else None) if not args.store_profile else
               clean_run(args.run_dir))
        if run.expected.kind != "mismatch":
            raise ValueError(f"{args.run_dir} failed by a crash ({run.expected.crash_key}); localize explains silent mismatches")
    except (RunDirError, ConfigError, ModelError, ValueError) as exc:
        print(f"rollout_lab.localize: {exc}", file=sys.stderr)
        return 2
    default_dir = "localize_on_policy" if args.against == "trainer" else "localize_no_fault" if args.no_fault else report.DIR_NAME
    out_dir = args.out or (run.run_dir / default_dir)
    try:
        result = localize(run, args, out_dir)
    except NothingToLocalize as exc:
        print(f"rollout_lab.localize: nothing to localize: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"rollout_lab.localize: {exc}", file=sys.stderr)
        return 2
    if not result.tokens:
        print(f"rollout_lab.localize: no chosen token was captured: {'; '.join(result.warnings)}", file=sys.stderr)
        return 2
    if args.store_profile:
        from rollout_lab.localize import profile

        if not result.num_clean_tokens:
            print("rollout_lab.localize: --store-profile: the replay showed no clean token", file=sys.stderr)
            return 2
        stored = profile.write(profile.CleanProfile(result.profile_key, [p.label() for p in result.points], result.clean_max,
                                                    result.num_clean_tokens, result.source))
        print(f"stored the clean profile {result.profile_key} ({result.num_clean_tokens} tokens) in {stored}")
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


def clean_run(run_dir: Path):
    """A run dir as a FailingRun whether or not it flagged a token (--store-profile measures clean ones):
    its first step, judged by the run's own spike threshold."""
    from rollout_lab.minimize.predicate import load_run
    from rollout_lab.records import read_config, read_summary
    from rollout_lab.tolerances import threshold_for

    run = load_run(run_dir, threshold=0.0)  # 0: any token not bitwise equal, so a clean run loads too
    summary = read_summary(run_dir)
    threshold = summary.spike_threshold if summary.spike_threshold is not None else threshold_for(read_config(run_dir))[0]
    return replace(run, expected=replace(run.expected, spike_threshold=threshold))


def spread_tokens(case, chosen_inputs: list[int]) -> list[tuple[int, int]]:
    """(request, input position) of the tokens that may set clean levels: CLEAN_POSITIONS of
    CLEAN_REQUESTS requests spread over the step, and the localized tokens' input positions on them."""
    spread = sorted({i * len(case.requests) // CLEAN_REQUESTS for i in range(CLEAN_REQUESTS)})
    wanted = set()
    for i in spread:
        prompt_len = len(case.requests[i].prompt_token_ids)
        wanted |= {(i, prompt_len - 1 + k) for k in CLEAN_POSITIONS}
        wanted |= {(i, q) for q in chosen_inputs if q >= prompt_len - 1}  # a completion row of request i
    return sorted(wanted)


def localize(run, args: argparse.Namespace, out_dir: Path):
    """The two replays and the reference; a report.Localization."""
    import torch
    from rich.progress import Progress

    from rollout_lab import compat
    from rollout_lab.instrument import SCHEDULE_LOG_ENV, ScheduleReader
    from rollout_lab.localize import capture, profile
    from rollout_lab.localize.divergence import (SHAPE_FLOOR, TokenLocalization, clean_levels, divergence, is_clean,
                                                 localize_token, request_facts)
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
    dtype = str(case.engine_args.get("dtype", "float32"))
    # The shape rule needs a rounding floor; the bitwise on-policy check has its clean level 0 instead.
    shape_floor = None if on_policy else SHAPE_FLOOR.get(dtype, SHAPE_FLOOR["bfloat16"])
    if on_policy:
        # The sampler's batch-invariant mode is read when vLLM is imported (sampler.py sets it the same way).
        os.environ["VLLM_BATCH_INVARIANT"] = "1" if run.config.engine.batch_invariant else "0"
    with Progress(transient=True) as progress:
        task = progress.add_task("starting the engine and the reference", total=5)
        # The float32 reference on the GPU when there is one: its per-layer hooks run one request at a
        # time, and a Mamba model without mamba_ssm's kernels scans in PyTorch, minutes per token on CPU.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reference = build_model(case.model, run.config.trainer).eval() if on_policy else load_reference(case.model, device)
        points = points_of(reference)
        llm = start_engine(case, with_fault=False)
        engine.remember_clean(llm)
        schedule = ScheduleReader(schedule_path)
        keys = [capture.row_key(p) for p in points]

        def divergences(vllm_tokens, outputs) -> dict[tuple[int, int], tuple[list[float], "torch.Tensor"]]:
            """(request, input position) -> (divergence per point, the reference's logits row)."""
            # A token some point missed (its position was not its request's last row, so no logits) is left out.
            whole = [v for v in vllm_tokens if all(k in v.rows for k in keys)]
            sequences = {i: out.prompt_token_ids + out.token_ids for i, out in enumerate(outputs)}
            refs = {(r.request, r.input_position): r.rows for r in
                    reference_tokens(reference, points, sequences, [(t.request, t.input_position) for t in whole])}
            return {(v.request, v.input_position): ([divergence(v.rows[k], refs[v.request, v.input_position][k]) for k in keys],
                                                    refs[v.request, v.input_position]["logits"]) for v in whole}

        def abs_diff(outputs, request: int, position: int, ref_logits) -> float:
            out = outputs[request]
            ref_logprob = float(torch.log_softmax(ref_logits.double(), -1)[out.token_ids[position]])
            return abs(out.logprobs[position] - ref_logprob)

        try:
            progress.update(task, advance=1, description="replay: the worst tokens")
            engine.reset(llm)
            if fault is not None:
                engine.install_fault(llm, case.fault, case.fault_params)
            outcome = run_case(llm, reference, case, run.expected, worst=10**9)
            if outcome.crash_key is not None:
                raise ValueError(f"the replay crashed: {outcome.describe()}")
            if not args.no_fault and not args.token and not args.store_profile and not outcome.num_flagged:
                raise NothingToLocalize(f"the replay flagged no token ({outcome.describe()}, threshold {threshold:g})")
            chosen = choose(outcome.worst, args.token, args.tokens, threshold)
            wanted = [(d.request, len(case.requests[d.request].prompt_token_ids) + d.position - 1) for d in chosen]
            spread = [] if on_policy else [t for t in spread_tokens(case, sorted({q for _, q in wanted})) if t not in set(wanted)]

            progress.update(task, advance=1, description=f"replay capturing {len(wanted)} tokens and {len(spread)} for clean levels")
            engine.reset(llm)
            if fault is not None:
                engine.install_fault(llm, case.fault, case.fault_params)
            if case.warmup:  # the engine's history the failure needs, as run_case ran it: not captured
                sample(llm, replace(case, requests=case.warmup, max_tokens=case.warmup_max_tokens, warmup=[]))
                # The capture and the schedule records know a request by its id, its index in the case:
                # the warm-up took ids 0.., so the case's requests would have come after them.
                llm.request_counter.reset()
            schedule.read_new()  # what the first replay (and the warm-up) scheduled
            llm.collective_rpc(capture.install, args=(points, wanted + spread))
            try:
                outputs = sample(llm, case)
            finally:
                vllm_tokens = llm.collective_rpc(capture.collect)[0]  # one worker (no tensor parallelism)
            log = schedule.read_new()
            progress.update(task, advance=1, description="reference on the captured tokens")
            by_key = divergences(vllm_tokens, outputs)
        finally:
            compat.shutdown(llm)
        progress.update(task, advance=1)

    # The clean tokens of the same replay: unflagged and without a jump (divergence.is_clean).
    clean, clean_positions = [], []
    for request, input_position in spread:
        position = input_position - len(case.requests[request].prompt_token_ids) + 1
        if (request, input_position) not in by_key or position >= len(outputs[request].token_ids):
            continue
        values, ref_logits = by_key[request, input_position]
        if shape_floor is not None and is_clean(values, abs_diff(outputs, request, position, ref_logits), threshold, shape_floor):
            clean.append(values)
            clean_positions.append(input_position)
    stored = None if on_policy else profile.read(case.model, dtype)
    stored_max = stored.levels_for(points) if stored is not None else None
    levels = [0.0] * len(points) if on_policy else clean_levels(clean, len(points), stored_max)
    clean_max = [max(row[p] for row in clean) for p in range(len(points))] if clean else [None] * len(points)
    sources = []
    if clean:
        sources.append(f"{len(clean)} clean tokens of the same replay, input positions {min(clean_positions)}-{max(clean_positions)}")
    elif not on_policy:
        sources.append(f"no clean token in the same replay ({len(spread)} captured for it, each flagged or with a jump)")
    if stored_max is not None:
        sources.append(f"the stored clean profile {stored.key} ({stored.tokens} tokens)")
    elif not on_policy:
        sources.append(f"no stored clean profile for {profile.profile_key(case.model, dtype)}")

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
        diff = abs_diff(outputs, d.request, d.position, ref_logits)
        facts = request_facts(log, str(d.request), prompt_len, d.position, len(out.token_ids),
                              out.num_preemptions, out.num_cached_tokens)
        tokens.append(localize_token(TokenLocalization(d.request, d.position, key[1], token_id, diff, diff > threshold,
                                                       values, facts), levels, shape_floor))
    return Localization(str(run.run_dir), case.model, fault, run.description, points, levels, len(clean), tokens,
                        round(time.perf_counter() - started, 1), warnings, "; ".join(sources), shape_floor, clean_max,
                        profile.profile_key(case.model, dtype), len(case.warmup))


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
