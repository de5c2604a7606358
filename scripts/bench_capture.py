"""Throughput cost of the localizer's capture (rollout_lab/localize/capture.py), measured in one run.

One engine (the default job's, eager), the same prompts and per-request seeds each time, rounds
interleaved so that drift hits all alike: plain (capture never installed), off (installed and
collected again just before: the state every lab engine is in when not localizing), and on with
nothing wanted (every hook installed, each forward looks for wanted tokens and finds none).
Prints the median tokens/s of each and the ratios to plain.
Usage: python scripts/bench_capture.py [--prompts 16] [--samples 4] [--max-tokens 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from transformers import AutoTokenizer

    from rollout_lab.config import RunConfig
    from rollout_lab.localize import capture
    from rollout_lab.localize.reference import points_of
    from rollout_lab.minimize.predicate import direct_engine_args
    from rollout_lab.minimize.standalone import Case, Request, sample, start_engine
    from rollout_lab.reference import load_reference
    from rollout_lab.models import resolve_model
    from rollout_lab.workload import encode_prompt, make_problems

    cfg = RunConfig()
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    requests = [Request(encode_prompt(tokenizer, p), seed=1000 * i + s)
                for i, p in enumerate(make_problems(args.prompts, 0)) for s in range(args.samples)]
    case = Case(model_path, direct_engine_args(cfg, model_path) | {"enforce_eager": True}, requests, args.max_tokens)
    points = points_of(load_reference(model_path))
    llm = start_engine(case, with_fault=False)

    def rate() -> float:
        start = time.perf_counter()
        outputs = sample(llm, case)
        return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start)

    rate()  # warm-up
    rates: dict[str, list[float]] = {"plain": [], "off": [], "on, nothing wanted": []}
    for _ in range(args.repeats):
        rates["plain"].append(rate())
        llm.collective_rpc(capture.install, args=(points, [(-1, 0)]))
        llm.collective_rpc(capture.collect)
        rates["off"].append(rate())
        llm.collective_rpc(capture.install, args=(points, [(-1, 0)]))
        rates["on, nothing wanted"].append(rate())
        llm.collective_rpc(capture.collect)
    llm.llm_engine.engine_core.shutdown()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    spread = {name: (max(v) - min(v)) / statistics.median(v) for name, v in rates.items()}
    print(", ".join(f"{name} {medians[name]:.1f} tok/s (spread {spread[name]:.1%})" for name in medians))
    print(f"ratio off/plain {medians['off'] / medians['plain']:.3f}, "
          f"on-nothing-wanted/plain {medians['on, nothing wanted'] / medians['plain']:.3f} "
          f"({args.repeats} interleaved rounds of {len(requests)} requests x {args.max_tokens} tokens)")


if __name__ == "__main__":
    main()
