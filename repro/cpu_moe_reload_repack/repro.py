"""[Bug]: CPU: reload_weights of an unquantized MoE model scrambles its experts (logprobs move by ~3)
Run: python repro.py [--model DIR_OR_HUB_ID]. One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED, 2 CANNOT RUN.
"""
import argparse, os, platform, sys, tempfile, traceback

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: the verdict is the last line

TOLERANCE = 1e-3  # the same engine on the same weights should agree bitwise; float32 vs transformers ~1e-6
TOKEN_IDS = [(37 * i + 11) % 997 + 3 for i in range(48)]  # a fixed 48-token prompt, in any vocabulary


def engine_choices(worker) -> str:
    runner, config = worker.model_runner, worker.vllm_config
    backends = sorted({g.backend.get_name() for groups in getattr(runner, "attn_groups", None) or [] for g in groups})
    cache, scheduler = config.cache_config, config.scheduler_config
    return (f"vLLM chose: {type(runner).__module__}.{type(runner).__name__}, attention {backends}, "
            f"block_size {cache.block_size}, mamba_cache_mode {getattr(cache, 'mamba_cache_mode', '-')}, "
            f"prefix caching {cache.enable_prefix_caching}, max_num_batched_tokens {scheduler.max_num_batched_tokens}, "
            f"chunked prefill {scheduler.enable_chunked_prefill}")


def moe_experts(worker) -> str:
    """The experts class vLLM picked for the first MoE layer (the one whose weights are packed)."""
    kernels = [m.quant_method.moe_kernel for m in worker.model_runner.get_model().modules()
               if getattr(getattr(m, "quant_method", None), "moe_kernel", None) is not None]
    return f"MoE experts: {type(kernels[0].fused_experts).__name__ if kernels else None}"


def build_model():
    """rollout_lab's qwen3-moe-tiny: 4 layers of 8 experts (top 2), seeded, float32, its head widened."""
    import torch, transformers
    config = transformers.Qwen3MoeConfig(vocab_size=1024, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # logits of std ~3, so that a changed layer shows in the logprobs
        model.lm_head.weight.normal_(0.0, 3.0 / config.hidden_size ** 0.5)
    model.save_pretrained(path := tempfile.mkdtemp(prefix="repro-model-"))
    return model, path


def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
    print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()} {platform.machine()}, cuda {torch.cuda.is_available()}")
    model, path = (None, args.model) if args.model else build_model()
    llm = vllm.LLM(model=path, dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
                   kv_cache_memory_bytes=64 * 2**20, seed=0)
    print(llm.collective_rpc(engine_choices)[0])
    print(llm.collective_rpc(moe_experts)[0])
    params = vllm.SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, prompt_logprobs=0, ignore_eos=True,
                                 detokenize=False)

    def serve() -> torch.Tensor:
        """The prompt logprobs of TOKEN_IDS, then those of 8 greedy tokens."""
        out = llm.generate([{"prompt_token_ids": TOKEN_IDS}], params, use_tqdm=False)[0]
        sampled = out.outputs[0]
        return torch.tensor([e[t].logprob for e, t in zip(out.prompt_logprobs[1:], TOKEN_IDS[1:])]
                            + [e[t].logprob for e, t in zip(sampled.logprobs, sampled.token_ids)])

    before = serve()
    if model is not None:
        with torch.no_grad():
            logits = model(torch.tensor([TOKEN_IDS])).logits[0, :-1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(TOKEN_IDS[1:])[:, None])[:, 0]
        print(f"fresh engine: max |vLLM - transformers| over the prompt = {(before[:47] - expected).abs().max():.2e}")
    llm.collective_rpc("reload_weights")  # in place, from the model's own checkpoint on disk
    llm.reset_prefix_cache()
    after = serve()
    diff = float((after - before).abs().max())
    print(f"after reload_weights() of the same checkpoint: max |after - before| over prompt + sampled = {diff:.2e}")
    if diff > TOLERANCE:
        return "REPRODUCED", f"reloading the unchanged weights moved vLLM's logprobs by {diff:.2e} (> {TOLERANCE})"
    return "NOT REPRODUCED", f"reloading the unchanged weights leaves the logprobs as they were ({diff:.2e} <= {TOLERANCE})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an MoE model directory or hub id (default: the tiny Qwen3-MoE built here)")
    try:
        verdict, why = reproduce(parser.parse_args())
    except Exception as exc:  # anything unexpected is no verdict on the bug
        traceback.print_exc()
        verdict, why = "CANNOT RUN", f"{type(exc).__name__}: {exc}"
    print(f"{verdict}: {why}".splitlines()[0], flush=True)
    sys.exit({"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}[verdict])
