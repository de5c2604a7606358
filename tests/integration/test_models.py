"""The embedded models as prepared on disk: plain float32 checkpoints that transformers loads.

vLLM loading is covered by the engine tests; the first run prepares the models (~1 minute).
"""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout_lab import models

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def prepared():
    return {name: models.prepare(name) for name in models.EMBEDDED}


def test_prepare_again_reuses_the_cache(prepared):
    before = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in prepared.items()}
    assert {name: models.prepare(name) for name in models.EMBEDDED} == prepared
    assert {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in prepared.items()} == before


def test_smollm2_is_a_plain_float32_checkpoint(prepared):
    path = prepared["smollm2"]
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert tokenizer.decode(model(ids).logits[0, -1].argmax()) == " Paris"


@pytest.mark.parametrize(
    "name, layer_types",
    [("hybrid-tiny", {"linear_attention", "full_attention"}), ("mamba2-tiny", {"linear_attention"})],
)
def test_tiny_model_has_informative_logits(prepared, name, layer_types):
    path = prepared[name]
    model = AutoModelForCausalLM.from_pretrained(path)
    assert set(model.config.layer_types) == layer_types
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == model.config.vocab_size == 49152
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    # Neither near-uniform (log 49152 = 10.8 nats) nor collapsed onto one token.
    assert torch.isfinite(logprobs).all() and 3.0 < entropy.mean() < 9.0
