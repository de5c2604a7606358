"""Throughput cost of the scheduling records (engine.record_schedule), measured in one run.

Starts the same engine twice, without and with rollout_lab's RecordingScheduler, samples the
same prompts with the same per-request seeds, and prints tokens/s of each and their ratio
(instrumented / bare; the records stay on by default only while this is >= 0.95).
Usage: python scripts/bench_instrument.py [--prompts 16] [--samples 4] [--max-tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor


def tokens_per_second(record_schedule: bool, args) -> float:
    from transformers import AutoTokenizer

    from rollout_lab.config import RunConfig
    from rollout_lab.models import resolve_model
    from rollout_lab.sampler import PromptRequest, SamplerWorker
    from rollout_lab.workload import encode_prompt, make_problems

    cfg = RunConfig(run_dir=tempfile.mkdtemp())
    cfg.engine.record_schedule = record_schedule
    cfg.workload.samples_per_prompt, cfg.workload.max_tokens = args.samples, args.max_tokens
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [PromptRequest(i, encode_prompt(tokenizer, p)) for i, p in enumerate(make_problems(args.prompts, 0))]
    worker = SamplerWorker(cfg, 0, model_path)
    worker.ready()
    worker.generate(0, prompts)  # warm-up
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        batch = worker.generate(0, prompts)
        rates.append(sum(len(s.token_ids) for s in batch.samples) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # One engine per process: an in-process vLLM engine does not give its memory back.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        bare = pool.submit(tokens_per_second, False, args).result()
        recorded = pool.submit(tokens_per_second, True, args).result()
    print(f"bare {bare:.1f} tok/s, with scheduling records {recorded:.1f} tok/s, ratio {recorded / bare:.3f}")


if __name__ == "__main__":
    main()
