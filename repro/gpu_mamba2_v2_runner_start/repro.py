"""[Bug]: a Mamba2 model fails to start with VLLM_USE_V2_MODEL_RUNNER=1 (AssertionError in mamba_attn)
Run: python repro.py [--model DIR_OR_HUB_ID] [--runner v1|v2]. One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED, 2 CANNOT RUN.
"""
import argparse, os, platform, sys, tempfile, traceback

# The model: rollout_lab's mamba2-tiny, rebuilt here: seeded random weights.
MODEL_CONFIG = {'num_heads': 8, 'vocab_size': 49152, 'hidden_size': 256, 'state_size': 64,
    'num_hidden_layers': 4, 'pad_token_id': 2, 'bos_token_id': 1, 'n_groups': 1,
    'initializer_range': 0.02, 'time_step_rank': 16}
# A bounded share of the GPU with an explicit cache size, so the repro can share the GPU.
ENGINE_ARGS = {'dtype': 'float32', 'enforce_eager': True, 'max_model_len': 512, 'gpu_memory_utilization': 0.1,
    'kv_cache_memory_bytes': 1000000000, 'seed': 0}

def build_model() -> str:
    import torch, transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Mamba2Config(**MODEL_CONFIG))  # float32
    model.save_pretrained(path := tempfile.mkdtemp(prefix="repro-model-"))
    return path

def reproduce(args) -> tuple[str, str]:
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if args.runner == "v2" else "0"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its exceptions reach us
    import torch, transformers, vllm
    print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__, platform.platform())
    llm = vllm.LLM(model=args.model or build_model(), skip_tokenizer_init=True, **ENGINE_ARGS)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8]}], vllm.SamplingParams(max_tokens=4, detokenize=False),
                       use_tqdm=False)
    return "NOT REPRODUCED", f"the engine started ({args.runner} runner) and generated {out[0].outputs[0].token_ids}"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory or hub id (default: the model above)")
    parser.add_argument("--runner", choices=["v1", "v2"], default="v2", help="vLLM's model runner (default v2: the failing one)")
    try:
        verdict, why = reproduce(parser.parse_args())
    except Exception as exc:
        print(trace := "".join(traceback.format_exception(exc)), end="")
        crashed = isinstance(exc, AssertionError) and ", in _compute_common_metadata\n" in trace
        verdict, why = ("REPRODUCED" if crashed else "CANNOT RUN"), f"{type(exc).__name__}: {exc}"
    print(f"{verdict}: {why}".splitlines()[0], flush=True)
    sys.exit({"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}[verdict])
