"""[Bug]: CPU: Mamba2 with enable_prefix_caching=True raises IndexError in conv_ssm_forward
Run: python repro.py [--model DIR_OR_HUB_ID]. One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED,
2 CANNOT RUN.
"""
import argparse, os, platform, sys, tempfile, traceback

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its exceptions reach us

# The model: rollout_lab's mamba2-tiny, rebuilt here (seeded random float32 weights; no download).
MODEL_CONFIG = {'num_heads': 8, 'vocab_size': 49152, 'hidden_size': 256, 'state_size': 64,
    'num_hidden_layers': 4, 'pad_token_id': 2, 'bos_token_id': 1, 'n_groups': 1,
    'initializer_range': 0.02, 'time_step_rank': 16}

def build_model() -> str:
    import torch, transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Mamba2Config(**MODEL_CONFIG), dtype=torch.float32)
    model.get_output_embeddings().weight.data.normal_(0.0, 3.0 / MODEL_CONFIG["hidden_size"] ** 0.5)  # logits of std ~3
    model.save_pretrained(path := tempfile.mkdtemp(prefix="repro-model-"))
    return path

ENGINE_ARGS = {'dtype': 'float32', 'enable_prefix_caching': True, 'enforce_eager': True,
    'kv_cache_memory_bytes': 268435456}
PROMPTS = [
    # '. What is 12 + 19? Answer with just the number.'
    [30, 1812, 314, 216, 33, 34, 1232, 216, 33, 41, 47, 19842, 351, 915, 260, 1230, 30],
]
REQUESTS = [0]  # the prompt of each request, sampled in one generate call
SAMPLING = {'max_tokens': 1, 'temperature': 0.0}


def engine_choices(worker) -> str:
    runner, config = worker.model_runner, worker.vllm_config
    backends = sorted({g.backend.get_name() for groups in getattr(runner, "attn_groups", None) or [] for g in groups})
    cache, scheduler = config.cache_config, config.scheduler_config
    return (f"vLLM chose: {type(runner).__module__}.{type(runner).__name__}, attention {backends}, "
            f"block_size {cache.block_size}, mamba_cache_mode {getattr(cache, 'mamba_cache_mode', '-')}, "
            f"prefix caching {cache.enable_prefix_caching}, max_num_batched_tokens {scheduler.max_num_batched_tokens}, "
            f"chunked prefill {scheduler.enable_chunked_prefill}")

CRASH = ('IndexError', 'conv_ssm_forward')  # the failure: this exception, raised in this vLLM function

def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
    print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__, platform.platform())
    llm = vllm.LLM(model=args.model or build_model(), skip_tokenizer_init=True, **ENGINE_ARGS)
    print(llm.collective_rpc(engine_choices)[0])
    params = [vllm.SamplingParams(detokenize=False, **SAMPLING) for _ in REQUESTS]
    llm.generate([{"prompt_token_ids": PROMPTS[p]} for p in REQUESTS], params, use_tqdm=False)
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
