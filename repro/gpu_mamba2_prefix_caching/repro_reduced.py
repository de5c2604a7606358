"""[Bug]: Mamba2 + enable_prefix_caching: ValueError (slice step cannot be zero) in conv_ssm_forward
Run: python repro_reduced.py [--model DIR_OR_HUB_ID]. One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED, 2 CANNOT RUN.
"""
import argparse, os, platform, sys, tempfile, traceback

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its exceptions reach us

# The model: rollout_lab's mamba2-tiny, rebuilt here: seeded random weights, the head widened to spread logits.
MODEL_CONFIG = {'num_heads': 8, 'vocab_size': 49152, 'hidden_size': 256, 'state_size': 64,
    'num_hidden_layers': 4, 'pad_token_id': 2, 'bos_token_id': 1, 'n_groups': 1,
    'initializer_range': 0.02, 'time_step_rank': 16}

def build_model() -> str:
    import torch, transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Mamba2Config(**MODEL_CONFIG))  # float32
    model.get_output_embeddings().weight.data.normal_(0.0, 3.0 / MODEL_CONFIG["hidden_size"] ** 0.5)
    model.save_pretrained(path := tempfile.mkdtemp(prefix="repro-model-"))
    return path

ENGINE_ARGS = {'dtype': 'float32', 'enable_prefix_caching': True, 'enable_chunked_prefill': True,
    'enforce_eager': True, 'seed': 0, 'logprobs_mode': 'raw_logprobs', 'disable_log_stats': False,
    # a bounded share of the GPU with an explicit cache size (not vLLM's default 90%), as repro.py has
    'gpu_memory_utilization': 0.1, 'kv_cache_memory_bytes': 2000000000}
PROMPTS = [
    # '6 * 5? Answer with just the number.<|im_end|>\n<|im_start|>assistant\n'
    [38, 1672, 216, 37, 47, 19842, 351, 915, 260, 1230, 30, 2, 198, 1, 520, 9531, 198],
]
REQUESTS = [(0, 1433104176)]  # (prompt, seed) of each request, sampled in one generate call
SAMPLING = {'max_tokens': 1, 'temperature': 1.0, 'top_p': 1.0, 'top_k': -1}

CRASH = ('ValueError', 'conv_ssm_forward')  # the failure: this exception, raised in this vLLM function

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
