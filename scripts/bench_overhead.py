"""What rollout_lab costs on top of the bare engine and the bare model, measured in one run.

Prints two ratios (target >= 0.90 each):
  sampler: rollout_lab's SamplerWorker.generate (logprob capture, typed records, Parquet writing)
           vs bare `vllm.LLM.generate` on the same engine, prompts and seeds, tokens/s.
  trainer: Trainer.logprobs (teacher-forced recompute) vs a bare transformers forward pass on
           the same padded batches, tokens/s.
Usage: python scripts/bench_overhead.py [--prompts 16] [--samples 4] [--max-tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from rollout_lab.config import RunConfig
    from rollout_lab.models import resolve_model
    from rollout_lab.records import token_table, write_step
    from rollout_lab.sampler import PromptRequest, SamplerWorker, request_seed
    from rollout_lab.reference import pad_sequences
    from rollout_lab.trainer import Trainer
    from rollout_lab.workload import encode_prompt, make_problems

    cfg = RunConfig()
    cfg.workload.num_prompts, cfg.workload.samples_per_prompt = args.prompts, args.samples
    cfg.workload.max_tokens = args.max_tokens
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [PromptRequest(i, encode_prompt(tokenizer, p)) for i, p in enumerate(make_problems(args.prompts, 0))]

    worker = SamplerWorker(cfg, 0, model_path)
    worker.ready()
    bare_requests = [{"prompt_token_ids": p.token_ids} for p in prompts for _ in range(args.samples)]
    bare_params = [
        SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=request_seed(0, 0, p.prompt_index, s))
        for p in prompts
        for s in range(args.samples)
    ]
    out_dir = tempfile.mkdtemp()
    batches = []

    def bare():
        outputs = worker.llm.generate(bare_requests, bare_params, use_tqdm=False)
        bare.tokens = sum(len(o.outputs[0].token_ids) for o in outputs)

    def ours():
        batch = worker.generate(0, prompts)
        table = token_table("bench", batch, [np.asarray(s.sampler_logprobs) for s in batch.samples], [0.0] * len(batch.samples))
        write_step(out_dir, 0, table)
        ours.tokens = table.num_rows
        batches.append(batch)

    bare(), ours()  # warm-up
    bare_s, ours_s = median_seconds(bare, args.repeats), median_seconds(ours, args.repeats)
    sampler_ratio = (ours.tokens / ours_s) / (bare.tokens / bare_s)
    print(f"sampler: bare {bare.tokens / bare_s:.1f} tok/s, rollout_lab {ours.tokens / ours_s:.1f} tok/s, ratio {sampler_ratio:.3f}")
    del worker
    import gc

    gc.collect()

    trainer = Trainer(model_path, cfg.trainer)
    sequences = [(s.prompt_token_ids, s.token_ids) for s in batches[-1].samples]
    num_tokens = sum(len(c) for _, c in sequences)

    @torch.no_grad()
    def bare_forward():
        for start in range(0, len(sequences), cfg.trainer.micro_batch_size):
            input_ids, mask = pad_sequences(sequences[start : start + cfg.trainer.micro_batch_size])
            trainer.model(input_ids=input_ids, attention_mask=mask).logits

    def recompute():
        trainer.logprobs(sequences)

    bare_forward(), recompute()
    bare_t, ours_t = median_seconds(bare_forward, args.repeats), median_seconds(recompute, args.repeats)
    trainer_ratio = bare_t / ours_t
    print(f"trainer: bare forward {num_tokens / bare_t:.1f} tok/s, logprob recompute {num_tokens / ours_t:.1f} tok/s, ratio {trainer_ratio:.3f}")


if __name__ == "__main__":
    main()
