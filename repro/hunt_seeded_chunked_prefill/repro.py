"""[Bug]: Seeded sampling crashes when chunked prefill splits the prompt (CPU)

A request with a per-request seed whose 65-token prompt is longer than max_num_batched_tokens=64, so
that its prefill is split in two chunks, raises RuntimeError: CPU Generator does not use offset in
gpu_model_runner._bookkeeping_sync (set_offset on a partly prefilled request's generator).
Run: python repro.py [--model DIR_OR_HUB_ID]. One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED, 2 CANNOT RUN.
"""
import argparse, os, platform, sys, tempfile, traceback

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its exceptions reach us

# The model: rollout_lab's hybrid-tiny, rebuilt here: seeded random weights, the head widened to spread logits.
MODEL_CONFIG = {'vocab_size': 49152, 'hidden_size': 256, 'intermediate_size': 512,
    'num_hidden_layers': 4, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'pad_token_id': 2,
    'rope_parameters': {'rope_type': 'default', 'rope_theta': 10000.0}, 'attention_multiplier':
    0.125, 'num_local_experts': 0, 'num_experts_per_tok': 0, 'shared_intermediate_size': 512,
    'position_embedding_type': 'rope', 'layer_types': ['linear_attention', 'full_attention',
    'linear_attention', 'full_attention'], 'mamba_n_heads': 8, 'mamba_d_state': 64}

def build_model() -> str:
    import torch, transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.GraniteMoeHybridConfig(**MODEL_CONFIG))  # float32
    model.get_output_embeddings().weight.data.normal_(0.0, 3.0 / MODEL_CONFIG["hidden_size"] ** 0.5)
    model.save_pretrained(path := tempfile.mkdtemp(prefix="repro-model-"))
    return path

ENGINE_ARGS = {'dtype': 'bfloat16', 'max_num_batched_tokens': 64, 'disable_log_stats': False,
    'enforce_eager': True, 'kv_cache_memory_bytes': 268435456}
PROMPTS = [
    # '? Answer with just the number. What is 9 * 14? Answer with just the number. What is 13 + 15? 
    [47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216, 41, 1672, 216, 33, 36, 47, 19842, 351, 915,
    260, 1230, 30, 1812, 314, 216, 33, 35, 1232, 216, 33, 37, 47, 19842, 351, 915, 260, 1230, 30,
    1812, 314, 216, 33, 32, 731, 216, 41, 47, 19842, 351, 915, 260, 1230, 30, 1812, 314, 216, 33,
    41, 1232, 216, 33, 38, 47, 19842, 351],
]
REQUESTS = [(0, 2096179276)]  # (prompt, seed) of each request, sampled in one generate call
SAMPLING = {'max_tokens': 1, 'temperature': 1.0, 'top_p': 1.0, 'top_k': -1}

CRASH = ('RuntimeError', '_bookkeeping_sync')  # the failure: this exception, raised in this vLLM function

def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
    print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__, platform.platform())
    llm = vllm.LLM(model=args.model or build_model(), skip_tokenizer_init=True, **ENGINE_ARGS)
    params = [vllm.SamplingParams(seed=seed, detokenize=False, **SAMPLING) for _, seed in REQUESTS]
    llm.generate([{"prompt_token_ids": PROMPTS[p]} for p, _ in REQUESTS], params, use_tqdm=False)
    return "NOT REPRODUCED", f"generate returned {len(REQUESTS)} completion(s) without an error"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory or hub id (default: the model above)")
    try:
        verdict, why = reproduce(parser.parse_args())
    except Exception as exc:  # the crash, or anything unexpected
        print(trace := "".join(traceback.format_exception(exc)), end="")  # chained exceptions included
        crashed = type(exc).__name__ == CRASH[0] and (CRASH[1] is None or f", in {CRASH[1]}\n" in trace)
        verdict, why = ("REPRODUCED" if crashed else "CANNOT RUN"), f"{type(exc).__name__}: {exc}"
    print(f"{verdict}: {why}".splitlines()[0], flush=True)
    sys.exit({"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}[verdict])
