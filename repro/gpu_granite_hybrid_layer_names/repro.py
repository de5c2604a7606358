"""[Bug]: GraniteMoeHybrid fails to load under transformers 5: KeyError 'linear_attention' in get_layer
Run: python repro.py [--model DIR_OR_HUB_ID, e.g. ibm-granite/granite-4.0-h-350m].
One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED, 2 CANNOT RUN.
"""
import argparse, json, os, platform, sys, tempfile, traceback

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its exceptions reach us
HUB_LAYER_NAMES = ["mamba", "attention", "mamba", "attention"]

def build_model() -> str:
    """A 4-layer GraniteMoeHybrid with seeded random weights, its config.json in the hub's layer names."""
    import torch, transformers
    torch.manual_seed(0)
    config = transformers.GraniteMoeHybridConfig(
        hidden_size=256, num_hidden_layers=4, layer_types=HUB_LAYER_NAMES, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512, shared_intermediate_size=512, num_local_experts=0,
        num_experts_per_tok=0, mamba_n_heads=8, mamba_d_state=64, mamba_n_groups=1, vocab_size=49152,
        position_embedding_type="rope", max_position_embeddings=2048)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path := tempfile.mkdtemp(prefix="repro-model-"))
    config_file = os.path.join(path, "config.json")
    saved = json.load(open(config_file))
    json.dump({**saved, "layer_types": HUB_LAYER_NAMES}, open(config_file, "w"))  # as the hub's checkpoints write it
    return path

def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
    print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__, platform.platform())
    model = args.model or build_model()
    print("transformers reads layer_types as", transformers.AutoConfig.from_pretrained(model).layer_types[:4])
    # A bounded share of the GPU with an explicit cache size, so the repro can share the GPU.
    vllm.LLM(model=model, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.1,
             kv_cache_memory_bytes=1_000_000_000)
    return "NOT REPRODUCED", "the engine started"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory or hub id (default: the model above)")
    try:
        verdict, why = reproduce(parser.parse_args())
    except Exception as exc:
        print(trace := "".join(traceback.format_exception(exc)), end="")
        crashed = isinstance(exc, KeyError) and ", in get_layer\n" in trace
        verdict, why = ("REPRODUCED" if crashed else "CANNOT RUN"), f"{type(exc).__name__}: {exc}"
    print(f"{verdict}: {why}".splitlines()[0], flush=True)
    sys.exit({"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}[verdict])
