"""[Bug]: VLLM_BATCH_INVARIANT=1: a greedy request's logprobs change once its batch holds 32 requests
Run: python repro.py [--model DIR_OR_HUB_ID|seeded] [--dtype bfloat16|float32] (seeded: SmolLM2-135M's
architecture with seeded random weights, built here, no download).
One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED, 2 CANNOT RUN.
"""
import argparse, os, platform, sys, traceback

os.environ["VLLM_BATCH_INVARIANT"] = "1"  # read when vLLM is imported
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

# The lab measured this on its own de-quantized copy of SmolLM2-135M-Instruct (pass --model DIR);
# the hub's weights differ slightly.
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BATCH_SIZES = [8, 16, 32, 64]
# "What is {a} + {b}? Answer with just the number." as SmolLM2's tokenizer encodes it (digit i is token 32 + i).
DIGITS = lambda n: [32 + int(c) for c in str(n)]
PROMPTS = [[1780, 314, 216, *DIGITS(a), 1232, 216, *DIGITS(b), 47, 19842, 351, 915, 260, 1230, 30]
           for a in range(2, 12) for b in range(3, 10)][:max(BATCH_SIZES)]
# SmolLM2-135M's architecture (its config.json), for --model seeded.
SEEDED_CONFIG = {'hidden_size': 576, 'intermediate_size': 1536, 'num_hidden_layers': 30, 'num_attention_heads': 9,
    'num_key_value_heads': 3, 'head_dim': 64, 'vocab_size': 49152, 'max_position_embeddings': 8192,
    'rms_norm_eps': 1e-5, 'rope_theta': 100000.0, 'tie_word_embeddings': True, 'bos_token_id': 1,
    'eos_token_id': 2, 'pad_token_id': 2}


def build_model() -> str:
    import tempfile, torch, transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SEEDED_CONFIG))  # float32
    model.save_pretrained(path := tempfile.mkdtemp(prefix="repro-model-"))
    return path


def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
    from vllm import LLM, SamplingParams

    print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__,
          platform.platform(), torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
    # A bounded share of the GPU with an explicit KV cache (2 GB holds the batch of 64), so that
    # other processes can share the GPU and vLLM does not size the cache from their memory.
    llm = LLM(model=build_model() if args.model == "seeded" else args.model, dtype=args.dtype, enforce_eager=True,
              max_model_len=512, gpu_memory_utilization=0.1, kv_cache_memory_bytes=2_000_000_000,
              skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=5, detokenize=False)

    def run(prompts):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(list(c.token_ids), [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)])
                for c in (o.outputs[0] for o in outputs)]

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
    parser.add_argument("--model", default=MODEL, help="model directory, hub id or 'seeded' (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    try:
        verdict, why = reproduce(args)
    except Exception as exc:  # anything unexpected is no verdict on the bug
        traceback.print_exc()
        verdict, why = "CANNOT RUN", f"{type(exc).__name__}: {exc}"
    print(f"{verdict}: {why}".splitlines()[0], flush=True)
    sys.exit({"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}[verdict])
