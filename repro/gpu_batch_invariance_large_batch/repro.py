"""[Bug]: VLLM_BATCH_INVARIANT=1: a greedy request's logprobs change once its batch holds 32 requests
Run: python repro.py [--model DIR_OR_HUB_ID] [--dtype bfloat16|float32].
One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED, 2 CANNOT RUN.
"""
import argparse, os, platform, sys, traceback

os.environ["VLLM_BATCH_INVARIANT"] = "1"  # read when vLLM is imported
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

# The lab measured this on its own de-quantized copy of SmolLM2-135M-Instruct (pass --model DIR);
# the hub's weights differ slightly.
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BATCH_SIZES = [8, 16, 32, 64]
PROMPTS = [f"What is {a} + {b}? Answer with just the number." for a in range(2, 12) for b in range(3, 10)][:max(BATCH_SIZES)]


def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
    from vllm import LLM, SamplingParams

    print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__,
          platform.platform(), torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.3, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=5)

    def run(prompts):
        return [(list(c.token_ids), [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)])
                for c in (o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False))]

    targets = PROMPTS[:4]
    alone = [run([p])[0] for p in targets]
    broken = []
    for size in BATCH_SIZES:
        in_batch = run(PROMPTS[:size])[:4]
        diff = max(abs(a - b) for (_, la), (_, lb) in zip(alone, in_batch) for a, b in zip(la, lb))
        tokens = sum(ta != tb for (ta, _), (tb, _) in zip(alone, in_batch))
        print(f"batch of {size}: max |logprob alone - in batch| {diff:.3g}, {tokens}/4 targets with other tokens")
        if diff > 0 or tokens:
            broken.append(size)
    if broken:
        return "REPRODUCED", f"logprobs depend on the batch with VLLM_BATCH_INVARIANT=1 at batch sizes {broken}"
    return "NOT REPRODUCED", f"bitwise equal alone and in batches of {BATCH_SIZES}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="model directory or hub id (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    try:
        verdict, why = reproduce(args)
    except Exception as exc:  # anything unexpected is no verdict on the bug
        traceback.print_exc()
        verdict, why = "CANNOT RUN", f"{type(exc).__name__}: {exc}"
    print(f"{verdict}: {why}".splitlines()[0], flush=True)
    sys.exit({"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}[verdict])
