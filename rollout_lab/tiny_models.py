"""The tiny seeded models' recipes: a transformers config per architecture (TINY_CONFIGS) and the
float32 model with seeded random weights built from it (build_tiny); models.py prepares and caches them.
"""
from __future__ import annotations

import math

# Std of the tiny models' logits (SmolLM2's are ~3.5): entropy ~6 nats instead of uniform.
_LOGIT_STD = 3.0
# The tiny models borrow SmolLM2's vocabulary and special tokens (<|im_start|>=1, <|im_end|>=2);
# their head is untied so that its init can be widened alone.
_TINY_COMMON = dict(
    vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False
)
# The attention geometry every tiny model shares: 4 heads of 64, 2 KV heads.
_TINY_ATTENTION = dict(
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048
)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
# The Mamba2 mixer of the hybrids that name it mamba_* (GraniteMoeHybrid, FalconH1): 8 heads of 64.
_TINY_MAMBA2 = dict(
    mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256
)


def _hybrid_config():
    from transformers import GraniteMoeHybridConfig

    hidden, heads = 256, 4
    return GraniteMoeHybridConfig(
        hidden_size=hidden,
        num_hidden_layers=4,
        # This transformers and vLLM 0.32 both call Mamba2 layers "linear_attention".
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        num_attention_heads=heads,
        num_key_value_heads=2,
        # Granite uses this as the softmax scale outright; 1.0 would skip 1/sqrt(head_dim).
        attention_multiplier=(hidden // heads) ** -0.5,
        position_embedding_type="rope",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=2048,
        # Dense: no routed experts, only the shared MLP in every layer.
        num_local_experts=0,
        num_experts_per_tok=0,
        intermediate_size=512,
        shared_intermediate_size=512,
        **_TINY_MAMBA2,
        **_TINY_COMMON,
    )


def _mamba2_config():
    from transformers import Mamba2Config

    return Mamba2Config(
        hidden_size=256,
        num_hidden_layers=4,
        num_heads=8,
        head_dim=64,
        state_size=64,
        # One group: transformers' gated RMSNorm spans the whole width, vLLM's spans a group.
        n_groups=1,
        expand=2,
        conv_kernel=4,
        chunk_size=256,
        # Mamba2Config defaults to 0.1; 0.02 like the hybrid.
        initializer_range=0.02,
        **_TINY_COMMON,
    )


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=4, intermediate_size=512, rope_parameters=_ROPE, **_TINY_ATTENTION, **_TINY_COMMON)


def _qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(num_hidden_layers=4, intermediate_size=512, rope_parameters=_ROPE, **_TINY_ATTENTION, **_TINY_COMMON)


def _gemma3_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        num_hidden_layers=4,
        intermediate_size=512,
        # Gemma 3's 5:1 local:global pattern, shortened; a 16-token window is narrower than every
        # prompt, so the sliding layers really mask.
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=16,
        query_pre_attn_scalar=64,
        rope_parameters={"sliding_attention": _ROPE, "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
        **_TINY_ATTENTION,
        **_TINY_COMMON,
    )


def _qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        num_hidden_layers=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        norm_topk_prob=True,
        rope_parameters=_ROPE,
        **_TINY_ATTENTION,
        **_TINY_COMMON,
    )


def _mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(
        num_hidden_layers=4,
        intermediate_size=256,
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_parameters=_ROPE,
        **_TINY_ATTENTION,
        **_TINY_COMMON,
    )


# Mamba1 (selective scan); its config defaults to initializer_range 0.1, 0.02 like the others.
_TINY_MAMBA1 = dict(
    hidden_size=256, num_hidden_layers=4, state_size=16, expand=2, conv_kernel=4, time_step_rank=16, initializer_range=0.02
)


def _mamba_config():
    from transformers import MambaConfig

    return MambaConfig(**_TINY_MAMBA1, **_TINY_COMMON)


def _falcon_mamba_config():
    from transformers import FalconMambaConfig

    # Mamba1 with RMS-normalized B, C and dt in the mixer; vLLM runs it with its Mamba model.
    return FalconMambaConfig(**_TINY_MAMBA1, **_TINY_COMMON)


def _jamba_config():
    from transformers import JambaConfig

    return JambaConfig(
        num_hidden_layers=4,
        intermediate_size=512,
        # Layers: mamba, attention+MoE, mamba, attention+MoE.
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=16,
        **_TINY_ATTENTION,
        **_TINY_COMMON,
    )


def _falcon_h1_config():
    from transformers import FalconH1Config

    return FalconH1Config(
        num_hidden_layers=4,
        intermediate_size=512,
        rope_parameters=_ROPE,
        # Every Falcon-H1 layer runs attention and Mamba2 side by side.
        mamba_d_ssm=512,
        **_TINY_MAMBA2,
        **_TINY_ATTENTION,
        **_TINY_COMMON,
    )


def _nemotron_h_config():
    from transformers import NemotronHConfig

    return NemotronHConfig(
        # No "moe" block: vLLM's fused MoE runs Nemotron-H's non-gated relu2 experts
        # (is_act_and_mul=False) only on CUDA, XPU and ROCm.
        layers_block_type=["linear_attention", "full_attention", "linear_attention", "mlp"],
        **_TINY_ATTENTION,
        intermediate_size=512,
        mamba_num_heads=8,
        mamba_head_dim=64,
        n_groups=1,
        ssm_state_size=64,
        conv_kernel=4,
        chunk_size=256,
        **_TINY_COMMON,
    )


def _zamba2_config():
    from transformers import Zamba2Config

    return Zamba2Config(
        hidden_size=256,
        num_hidden_layers=4,
        # Mamba2 layers with one shared attention+MLP block applied at the hybrid ones.
        layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"],
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=512,
        max_position_embeddings=2048,
        n_mamba_heads=8,
        mamba_d_state=64,
        mamba_ngroups=1,
        mamba_d_conv=4,
        mamba_expand=2,
        chunk_size=256,
        # vLLM's Zamba2 always ties its head to the embeddings; an untied checkpoint would lose its head.
        **_TINY_COMMON | {"tie_word_embeddings": True},
    )




# Each tiny model: its transformers config, seeded random weights (docs/models.md: verified where).
TINY_CONFIGS = {
    "hybrid-tiny": _hybrid_config,
    "mamba2-tiny": _mamba2_config,
    "llama-tiny": _llama_config,
    "qwen3-tiny": _qwen3_config,
    "gemma3-tiny": _gemma3_config,
    "qwen3-moe-tiny": _qwen3_moe_config,
    "mixtral-tiny": _mixtral_config,
    "mamba-tiny": _mamba_config,
    "falcon-mamba-tiny": _falcon_mamba_config,
    "jamba-tiny": _jamba_config,
    "falcon-h1-tiny": _falcon_h1_config,
    "nemotron-h-tiny": _nemotron_h_config,
    "zamba2-tiny": _zamba2_config,
}


def build_tiny(name: str):
    """Tiny model `name` in memory, float32, its weights fixed by seed 0."""
    import torch
    from transformers import AutoModelForCausalLM

    config = TINY_CONFIGS[name]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # initializer_range alone gives logits of std ~0.3: near-uniform over 49k tokens, every
    # logprob ~ -10.8, so engine differences would hide. Widen the head to SmolLM2's spread.
    with torch.no_grad():
        if config.tie_word_embeddings:
            # Zamba2: a widened shared matrix would make the model echo its input token; widen
            # the logits through the final norm's gain instead.
            gain = _LOGIT_STD / (config.initializer_range * math.sqrt(config.hidden_size))
            model.model.final_layernorm.weight.fill_(gain)
        else:
            model.get_output_embeddings().weight.normal_(0.0, _LOGIT_STD / math.sqrt(config.hidden_size))
    return model
