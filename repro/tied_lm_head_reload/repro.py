"""vLLM CPU: in-place weight reload leaves a tied lm_head stale.

Found by rollout_lab while syncing RL weights into vLLM. On vLLM CPU, linear layers are repacked
into oneDNN handles after loading, and lm_head gets its own handle even when the checkpoint ties
it to embed_tokens. `model_runner.reload_weights(weights_iterator=...)` with the model's own
named parameters (no `lm_head.weight`: tied) updates embed_tokens but not lm_head's handle, so
every logprob after the reload comes from a stale output projection. Passing `lm_head.weight`
explicitly works around it.

Needs only vllm, torch, transformers. Builds a tiny random tied-embedding Llama in a temp dir.
Exits 1 while the bug is present, 0 once reloaded logprobs match transformers.
"""
import os
import platform
import sys
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TOLERANCE = 1e-3


def reload(worker, named):
    worker.model_runner.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)


def main() -> int:
    import torch
    import transformers
    import vllm
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm import LLM, SamplingParams

    print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"cuda={torch.cuda.is_available()}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, torch_dtype="float32")
    model = LlamaForCausalLM(config).eval()
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    token_ids = [int(t) for t in torch.randint(3, 1024, (48,), generator=torch.Generator().manual_seed(1))]

    llm = LLM(model=path, dtype="float32", skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=128, kv_cache_memory_bytes=64 * 2**20, seed=0)

    def worst_diff() -> float:
        out = llm.generate([{"prompt_token_ids": token_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)[0]
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
    print(f"after reload with lm_head.weight passed explicitly: {worst_diff():.2e}")
    if stale > TOLERANCE:
        print(f"BUG: reloaded weights are not what vLLM computes with (> {TOLERANCE})")
        return 1
    print("OK: reload updates the tied lm_head")
    return 0


if __name__ == "__main__":
    sys.exit(main())
