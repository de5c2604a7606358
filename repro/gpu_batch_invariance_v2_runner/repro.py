"""[Bug]: VLLM_BATCH_INVARIANT=1 with model runner v2 and CUDA graphs: a seeded request's logprobs change with a 5-request batch (H200, vLLM 0.25)

With vLLM's batch-invariant mode on, a request's output must not depend on what else is in the
batch (vLLM's test_logprobs_bitwise_batch_invariance_bs1_vs_bsN checks it bitwise). Here 5 seeded
requests sharing a ~250-token prefix run as one batch, twice, then each alone; found by
rollout_lab's hunt with VLLM_USE_V2_MODEL_RUNNER=1 and CUDA graphs on (bfloat16).
Run: python repro.py [--model DIR_OR_HUB_ID] [--dtype bfloat16|float32] [--eager] [--v1-runner].
One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED, 2 CANNOT RUN.
"""
import argparse, os, platform, sys, traceback

# The lab found this on its own de-quantized copy of SmolLM2-135M-Instruct (pass --model DIR).
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PREFIX = " ".join(f"What is {a} {op} {b}? Answer with just the number." for a, op, b in
                  [(18, "+", 5), (3, "*", 15), (24, "-", 7), (8, "*", 9), (21, "+", 13)] * 4)
SUFFIXES = [" What is 19 + 4?", " What is 7 * 8?", " What is 30 - 12?", " What is 6 * 6?", " What is 11 + 22?"]


def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
    from vllm import LLM, SamplingParams

    print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__,
          platform.platform(), torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=args.eager, max_model_len=1024, max_num_seqs=16,
              enable_prefix_caching=False, gpu_memory_utilization=0.3, seed=0)
    prompts = [PREFIX + s for s in SUFFIXES]
    params = [SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=32, logprobs=5) for i in range(len(prompts))]

    def run(indices):
        outs = llm.generate([prompts[i] for i in indices], [params[i] for i in indices], use_tqdm=False)
        return [(list(c.token_ids), [c.logprobs[j][t].logprob for j, t in enumerate(c.token_ids)])
                for c in (o.outputs[0] for o in outs)]

    everyone = list(range(len(prompts)))
    batch, again = run(everyone), run(everyone)
    alone = [run([i])[0] for i in everyone]
    print(f"batch run twice: {'bitwise equal' if batch == again else 'DIFFERENT (run-to-run nondeterminism)'}")
    differ = []
    for i, ((tb, lb), (ta, la)) in enumerate(zip(batch, alone)):
        same = next((j for j, (a, b) in enumerate(zip(ta, tb)) if a != b), min(len(ta), len(tb)))
        diff = max((abs(a - b) for a, b in zip(la[:same], lb[:same])), default=0.0)
        print(f"request {i}: max |logprob alone - in batch| {diff:.3g} over {same} shared tokens; "
              f"tokens {'equal' if ta == tb else f'differ from position {same}'}")
        if ta != tb or diff > 0:
            differ.append(i)
    if differ:
        return "REPRODUCED", f"requests {differ} of {len(prompts)} differ alone vs in the batch with VLLM_BATCH_INVARIANT=1"
    return "NOT REPRODUCED", f"all {len(prompts)} requests bitwise equal alone and in the batch"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="model directory or hub id (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True (no CUDA graphs): a control")
    parser.add_argument("--v1-runner", action="store_true", help="VLLM_USE_V2_MODEL_RUNNER=0: a control")
    args = parser.parse_args()
    os.environ["VLLM_BATCH_INVARIANT"] = "1"  # read when vLLM is imported
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0" if args.v1_runner else "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        verdict, why = reproduce(args)
    except Exception as exc:  # anything unexpected is no verdict on the bug
        traceback.print_exc()
        verdict, why = "CANNOT RUN", f"{type(exc).__name__}: {exc}"
    print(f"{verdict}: {why}".splitlines()[0], flush=True)
    sys.exit({"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}[verdict])
