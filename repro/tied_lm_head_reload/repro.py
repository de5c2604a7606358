"""[Bug]: CPU: reload_weights leaves a tied lm_head stale; logprobs keep the old output projection
Run: python repro.py. It prints one verdict line and exits 1 (REPRODUCED), 0 (NOT REPRODUCED) or 2
(CANNOT RUN).
"""
import os, platform, sys, tempfile, traceback

# The engine core in this process, so that collective_rpc takes a plain function.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
TOLERANCE = 1e-3  # clean float32 agrees to ~5e-5


def engine_choices(worker) -> str:
    runner, config = worker.model_runner, worker.vllm_config
    backends = sorted({g.backend.get_name() for groups in getattr(runner, "attn_groups", None) or [] for g in groups})
    cache, scheduler = config.cache_config, config.scheduler_config
    return (f"vLLM chose: {type(runner).__module__}.{type(runner).__name__}, attention {backends}, "
            f"block_size {cache.block_size}, mamba_cache_mode {getattr(cache, 'mamba_cache_mode', '-')}, "
            f"prefix caching {cache.enable_prefix_caching}, max_num_batched_tokens {scheduler.max_num_batched_tokens}, "
            f"chunked prefill {scheduler.enable_chunked_prefill}")


def reload(worker, named):
    worker.model_runner.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)


def reproduce() -> tuple[str, str]:
    import torch, transformers, vllm
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm import LLM, SamplingParams

    print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()} {platform.machine()}, cuda {torch.cuda.is_available()}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).float().eval()
    path = tempfile.mkdtemp(prefix="repro-model-")
    model.save_pretrained(path)
    token_ids = torch.randint(3, 1024, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = LLM(model=path, dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
              kv_cache_memory_bytes=64 * 2**20, seed=0)
    print(llm.collective_rpc(engine_choices)[0])

    def worst_diff() -> float:
        """max |vLLM - transformers float32| over the prompt logprobs of token_ids."""
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]
        served = torch.tensor([e[t].logprob for e, t in zip(out.prompt_logprobs[1:], token_ids[1:])])
        with torch.no_grad():
            logits = model(torch.tensor([token_ids])).logits[0, :-1].float()
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(token_ids[1:])[:, None])[:, 0]
        return float((served - expected).abs().max())

    print(f"before any update: max |vLLM - transformers| = {worst_diff():.2e}")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    llm.collective_rpc(reload, args=(named,))
    llm.reset_prefix_cache()
    stale = worst_diff()
    print(f"after reload_weights(named_parameters()): {stale:.2e}")
    llm.collective_rpc(reload, args=(named + [("lm_head.weight", model.lm_head.weight.detach().clone())],))
    llm.reset_prefix_cache()
    print(f"after a reload with lm_head.weight passed explicitly: {worst_diff():.2e}")
    if stale > TOLERANCE:
        return "REPRODUCED", f"after reload_weights vLLM's logprobs are {stale:.2e} off the reloaded weights' (> {TOLERANCE})"
    return "NOT REPRODUCED", f"reload_weights updates the tied lm_head ({stale:.2e} <= {TOLERANCE})"


if __name__ == "__main__":
    try:
        verdict, why = reproduce()
    except Exception as exc:  # anything unexpected is no verdict on the bug
        traceback.print_exc()
        verdict, why = "CANNOT RUN", f"{type(exc).__name__}: {exc}"
    print(f"{verdict}: {why}".splitlines()[0], flush=True)
    sys.exit({"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}[verdict])
