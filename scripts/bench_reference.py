"""Speed of the float32 reference (reference.reference_logprobs) against a plain batched forward, in one run.

The plain way: batches of 8 in input order, padded to the longest, logits and log-softmax over
every position. The lab's: shortest first under a padded-token budget, the lm_head and the
log-softmax only at the completions' positions. Both score the same hunt-like mix of sequences
(prompts of 8 to `--max-prompt` tokens, completions of 1 to 32); the script checks that they
agree and prints seconds of each and the ratio (plain / lab).
Usage: python scripts/bench_reference.py [--model smollm2] [--sequences 48] [--max-prompt 800] [--repeats 2]
"""
from __future__ import annotations

import argparse
import random
import time


def plain_logprobs(model, sequences, batch_size: int = 8) -> list[list[float]]:
    import torch

    from rollout_lab.reference import pad_sequences

    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        input_ids, attention_mask = pad_sequences(chunk)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        for row, (prompt, completion) in enumerate(chunk):
            out.append(logprobs[row, len(prompt) - 1 : len(prompt) - 1 + len(completion)].tolist())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sequences", type=int, default=48)
    parser.add_argument("--max-prompt", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from rollout_lab.reference import load_reference, reference_logprobs
    from rollout_lab.models import resolve_model

    model = load_reference(resolve_model(args.model))
    vocab = model.config.vocab_size
    rng = random.Random(0)
    sequences = [([rng.randrange(vocab) for _ in range(rng.randint(8, args.max_prompt))],
                  [rng.randrange(vocab) for _ in range(rng.randint(1, 32))]) for _ in range(args.sequences)]
    tokens = sum(len(p) + len(c) for p, c in sequences)
    timings = {"plain": [], "lab": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain_logprobs), ("lab", reference_logprobs)):
            started = time.perf_counter()
            result = fn(model, sequences)
            timings[name].append(time.perf_counter() - started)
            if name == "plain":
                expected = result
            else:
                worst = max(abs(a - b) for x, y in zip(expected, result) for a, b in zip(x, y))
                assert worst < 1e-3, f"the two disagree by {worst}"
    plain, lab = min(timings["plain"]), min(timings["lab"])
    print(f"{args.sequences} sequences, {tokens} tokens, {args.model}: plain {plain:.2f} s, lab {lab:.2f} s, "
          f"ratio plain/lab {plain / lab:.2f} (best of {args.repeats}; max |diff| {worst:.2g})")


if __name__ == "__main__":
    main()
