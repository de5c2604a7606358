"""resolve_model and prepare's bookkeeping (a stub in place of a real build), and the tiny recipes built in memory."""
from pathlib import Path

import pytest

from rollout_lab import models, tiny_models


@pytest.fixture
def builds(tmp_path, monkeypatch):
    """A cache under tmp_path whose smollm2 builder only records that it ran."""
    monkeypatch.setenv("ROLLOUT_LAB_CACHE", str(tmp_path))
    calls = []

    def build(out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setitem(models._BUILDERS, "smollm2", build)
    return calls


def test_prepare_builds_once_and_rebuilds_a_half_prepared_dir(builds, tmp_path):
    path = models.prepare("smollm2")
    assert path == tmp_path / "models" / "smollm2"
    assert (path / "config.json").exists() and models.is_prepared("smollm2")
    assert models.prepare("smollm2") == path and len(builds) == 1
    (path / models.MARKER).unlink()
    models.prepare("smollm2")
    assert len(builds) == 2 and models.is_prepared("smollm2")


def test_a_failed_prepare_leaves_no_model_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("ROLLOUT_LAB_CACHE", str(tmp_path))

    def build(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(models._BUILDERS, "smollm2", build)
    with pytest.raises(RuntimeError, match="interrupted"):
        models.prepare("smollm2")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2.lock"]


def test_resolve_model(builds, tmp_path):
    assert models.resolve_model("smollm2") == str(tmp_path / "models" / "smollm2")
    assert models.resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    for bad in ("/no/such/dir", "./no-such-dir", "~/no-such-dir", "gpt2", "a/b/c", ""):
        with pytest.raises(models.ModelError, match="smollm2, hybrid-tiny, mamba2-tiny"):
            models.resolve_model(bad)
    with pytest.raises(models.ModelError, match="no embedded model 'llama'"):
        models.prepare("llama")


# The architecture each tiny recipe must produce: what vLLM's model registry dispatches on.
ARCHITECTURES = {
    "hybrid-tiny": "GraniteMoeHybridForCausalLM",
    "mamba2-tiny": "Mamba2ForCausalLM",
    "llama-tiny": "LlamaForCausalLM",
    "qwen3-tiny": "Qwen3ForCausalLM",
    "gemma3-tiny": "Gemma3ForCausalLM",
    "qwen3-moe-tiny": "Qwen3MoeForCausalLM",
    "mixtral-tiny": "MixtralForCausalLM",
    "mamba-tiny": "MambaForCausalLM",
    "falcon-mamba-tiny": "FalconMambaForCausalLM",
    "jamba-tiny": "JambaForCausalLM",
    "falcon-h1-tiny": "FalconH1ForCausalLM",
    "nemotron-h-tiny": "NemotronHForCausalLM",
    "zamba2-tiny": "Zamba2ForCausalLM",
}


@pytest.mark.parametrize("name", sorted(tiny_models.TINY_CONFIGS))
def test_tiny_model_builds_the_same_weights_every_time(name):
    import torch

    first, second = tiny_models.build_tiny(name), tiny_models.build_tiny(name)
    assert type(first).__name__ == ARCHITECTURES[name]
    assert first.config.vocab_size == 49152 and first.config.eos_token_id == 2
    # Tiny: the 49152 x 256 embedding and head dominate; the layers add a few million.
    assert sum(p.numel() for p in first.parameters()) < 35_000_000
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_embedded_model_has_a_preset():
    conf = Path(__file__).parents[2] / "conf" / "model"
    assert {p.stem: p.read_text().strip() for p in conf.glob("*.yaml")} == {n: f"name: {n}" for n in models.EMBEDDED}
