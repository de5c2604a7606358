import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen3MoeConfig

from rollout_lab.trainer import checkpoint_weights
from rollout_lab.weight_sync import decode, encode


def test_round_trip_keeps_names_dtypes_and_bits():
    named = [
        ("a.weight", torch.randn(3, 4)),
        ("b.weight", torch.randn(5).to(torch.bfloat16)),
        ("c.bias", torch.randn(2).to(torch.float16)),
    ]
    back = list(decode(encode(named)))
    assert [n for n, _ in back] == ["a.weight", "b.weight", "c.bias"]
    for (_, original), (_, restored) in zip(named, back):
        assert restored.dtype == original.dtype
        assert torch.equal(restored, original)


def _saved_and_loaded(tmp_path, config):
    """A tiny random model from `config`, saved and loaded back as the trainer loads a checkpoint."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


_TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
MOE_CONFIGS = {
    "mixtral": lambda: MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **_TINY),
    "qwen3_moe": lambda: Qwen3MoeConfig(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, **_TINY),
}


@pytest.mark.parametrize("kind", list(MOE_CONFIGS))
def test_moe_weights_go_out_under_the_names_and_values_of_the_checkpoint(tmp_path, kind):
    model = _saved_and_loaded(tmp_path, MOE_CONFIGS[kind]())
    sent = dict(checkpoint_weights(model))
    # What vLLM reads from disk: the per-expert tensors, not transformers 5's fused experts.
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as disk:
        assert set(sent) == set(disk.keys())
        for name, tensor in sent.items():
            assert torch.equal(tensor, disk.get_tensor(name)), name
    assert not any("gate_up_proj" in name for name in sent)


def test_mixtral_experts_are_split_out_of_the_fused_tensors(tmp_path):
    model = _saved_and_loaded(tmp_path, MOE_CONFIGS["mixtral"]())
    sent = dict(checkpoint_weights(model))
    experts = model.model.layers[1].mlp.experts
    # gate_up_proj is [experts, 2 * intermediate, hidden]: gate (w1) rows first, then up (w3).
    prefix = "model.layers.1.block_sparse_moe.experts.3"
    assert torch.equal(sent[f"{prefix}.w1.weight"], experts.gate_up_proj[3, :16])
    assert torch.equal(sent[f"{prefix}.w3.weight"], experts.gate_up_proj[3, 16:])
    assert torch.equal(sent[f"{prefix}.w2.weight"], experts.down_proj[3])


def test_dense_weights_keep_their_names_and_a_tied_head_is_sent_again(tmp_path):
    model = _saved_and_loaded(tmp_path, LlamaConfig(intermediate_size=64, tie_word_embeddings=True, **_TINY))
    sent = dict(checkpoint_weights(model))
    assert set(sent) == {name for name, _ in model.named_parameters()} | {"lm_head.weight"}
    assert torch.equal(sent["lm_head.weight"], sent["model.embed_tokens.weight"])
