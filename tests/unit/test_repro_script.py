"""The emitted repro.py as source: it compiles, imports only vllm/torch/transformers/stdlib, fits its budget."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollout_lab import faults, tiny_models
from rollout_lab.minimize.script import LINE_BUDGET, POOL_HEAD_LINES, RANDOM_MODELS, ReproSpec, budget_lines, repro_source
from rollout_lab.minimize.standalone import Case, Expected, Request

ALLOWED = {"vllm", "torch", "transformers"}
# A long prompt (the seeded chunked prefill's 65 tokens) and several requests: the budget holds for real sizes.
PROMPT = list(range(1000, 1065))


def spec(kind: str, model: str, fault=None) -> ReproSpec:
    expected = (Expected("crash", 1e-3, crash_key="RuntimeError@vllm/v1/worker/gpu_worker.py:sample_tokens|"
                         "vllm/v1/worker/gpu_model_runner.py:_bookkeeping_sync")
                if kind == "crash" else Expected("mismatch", 1e-3, request_class="preempted"))
    requests = [Request(PROMPT, 7 + i, 0, i) for i in range(11)] + [Request(PROMPT[:17], 99, 1, 0)]
    case = Case("/cache/models/" + model, {"dtype": "float32", "block_size": 16, "kv_cache_memory_bytes": 2**22,
                                           "enforce_eager": True, "disable_log_stats": False},
                requests, 17, fault=fault, fault_params={"p": 1.0, "seed": 0} if fault else {})
    return ReproSpec("[Bug]: something breaks (CPU)", "Two plain sentences. Of what breaks.", model, case, expected,
                     ["What is 1 + 2? " * 8, "What is 3 + 4?"])


CASES = [(kind, model, fault) for kind in ("crash", "mismatch") for model in ("smollm2", "hybrid-tiny", "mamba2-tiny")
         for fault in (None, "stale_state")]


def imported_modules(source: str) -> set[str]:
    tree = ast.parse(source)
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


@pytest.mark.parametrize("kind,model,fault", CASES)
def test_the_emitted_source_compiles_imports_little_and_fits_its_budget(kind, model, fault):
    source = repro_source(spec(kind, model, fault))
    compile(source, "repro.py", "exec")
    outside = {m for m in imported_modules(source) if m.split(".")[0] not in ALLOWED | set(sys.stdlib_module_names)}
    assert not outside, outside
    assert "rollout_lab" not in {m.split(".")[0] for m in imported_modules(source)}
    assert budget_lines(source) <= LINE_BUDGET[kind], budget_lines(source)
    assert source.startswith('"""[Bug]: something breaks (CPU)')
    assert "    # 'What is 3 + 4?'" in source and "skip_tokenizer_init=True" in source


def test_a_planted_fault_is_carried_verbatim_labelled_and_optional():
    source = repro_source(spec("mismatch", "hybrid-tiny", "stale_state"))
    namespace = {}
    exec(compile(source, "repro.py", "exec"), namespace)  # __name__ is not __main__: nothing runs
    assert namespace["FAULT_SOURCE"] == Path(faults.__file__).read_text()
    assert "# ---- PLANTED FAULT (not vLLM as shipped)" in source and '"--no-fault"' in source
    assert (namespace["FAULT"], namespace["FAULT_PARAMS"]) == ("stale_state", {"p": 1.0, "seed": 0})
    # The budget leaves out the labelled section: the carried source and the few lines installing it.
    section = len(source.splitlines()) - budget_lines(source)
    assert len(namespace["FAULT_SOURCE"].splitlines()) < section < len(namespace["FAULT_SOURCE"].splitlines()) + 15
    assert "--no-fault" not in repro_source(spec("mismatch", "hybrid-tiny"))


@pytest.mark.parametrize("model", sorted(RANDOM_MODELS))
def test_an_embedded_random_model_is_rebuilt_from_the_labs_own_config(model):
    namespace = {}
    exec(compile(repro_source(spec("crash", model)), "repro.py", "exec"), namespace)
    config = RANDOM_MODELS[model]()
    assert type(config)(**namespace["MODEL_CONFIG"]).to_dict() == config.to_dict()
    widening = "final_layernorm.weight.data.fill_(" if config.tie_word_embeddings else f"{tiny_models._LOGIT_STD!r} / MODEL_CONFIG"
    assert widening in repro_source(spec("crash", model))


@pytest.mark.parametrize("model", ["qwen3-moe-tiny", "zamba2-tiny"])
def test_the_rebuilt_model_has_the_labs_weights_bitwise(model, tmp_path, monkeypatch):
    """build_model() of repro.py, run from its source, saves the weights tiny_models.build_tiny makes (an untied and a tied head)."""
    from safetensors.torch import load_file

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    namespace = {}
    exec(compile(repro_source(spec("crash", model)), "repro.py", "exec"), namespace)
    tiny_models.build_tiny(model).save_pretrained(tmp_path / "lab")

    def weights(path: Path) -> dict:
        return {k: v for shard in sorted(path.glob("*.safetensors")) for k, v in load_file(shard).items()}

    saved, lab = weights(Path(namespace["build_model"]())), weights(tmp_path / "lab")
    assert saved.keys() == lab.keys()
    assert all(torch.equal(saved[name], lab[name]) for name in saved)


def test_smollm2_names_the_public_hub_id_and_says_its_weights_differ():
    source = repro_source(spec("mismatch", "smollm2"))
    assert "MODEL = 'HuggingFaceTB/SmolLM2-135M-Instruct'" in source and "de-quantized" in source
    assert "args.model or MODEL" in source and "build_model" not in source and "tempfile" not in source


def test_a_repro_that_cannot_load_its_model_says_cannot_run_and_exits_2(tmp_path):
    script = tmp_path / "repro.py"
    script.write_text(repro_source(spec("crash", "mamba2-tiny")))
    done = subprocess.run([sys.executable, "-I", str(script), "--model", str(tmp_path / "no-such-model")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    verdicts = [line for line in done.stdout.splitlines() if line.split(":")[0] in ("REPRODUCED", "NOT REPRODUCED", "CANNOT RUN")]
    assert done.returncode == 2 and len(verdicts) == 1 and verdicts[0].startswith("CANNOT RUN: "), done.stdout[-2000:] + done.stderr[-2000:]


STUB_VLLM = '''
__version__ = "stub"


class SamplingParams:
    def __init__(self, **kwargs):
        pass


def _bookkeeping_sync():
    raise {exception}


class LLM:
    def __init__(self, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        _bookkeeping_sync() if {raises} else None

    def collective_rpc(self, method):
        return ["engine choices of the stub"]
'''


@pytest.mark.parametrize("exception,verdict,status", [
    ('RuntimeError("CPU Generator does not use offset")', "REPRODUCED: RuntimeError: CPU Generator does not use offset", 1),
    ('ValueError("another bug")', "CANNOT RUN: ValueError: another bug", 2),
    (None, "NOT REPRODUCED: generate returned 12 completion(s) without an error", 0),
])
def test_a_crash_repro_reproduces_only_on_its_exception_in_its_vllm_function(tmp_path, exception, verdict, status):
    """The emitted crash script against a stand-in vllm whose generate raises (or not) in _bookkeeping_sync."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(STUB_VLLM.format(exception=exception, raises=exception is not None))
    script = tmp_path / "repro.py"
    script.write_text(repro_source(spec("crash", "smollm2")))
    # Not -I: the stand-in vllm beside the script must win over the installed one.
    done = subprocess.run([sys.executable, str(script), "--model", "m"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert (done.stdout.strip().splitlines()[-1], done.returncode) == (verdict, status), done.stdout[-2000:] + done.stderr[-2000:]


def test_prompts_sharing_a_long_prefix_carry_it_once_and_evaluate_to_the_same_token_ids():
    shared = list(range(2000, 2240))
    prompts = [shared + [7, 8, 9], shared + [10], shared + list(range(300, 340))]
    s = spec("mismatch", "smollm2")
    s.case.requests = [Request(p, 5 + i, i, 0) for i, p in enumerate(prompts)]
    s.prompt_texts = ["What is 1 + 2?"] * 3
    source = repro_source(s)
    assert source.count("2000, 2001") == 1 and "PREFIX + [7, 8, 9]" in source
    block = source[source.index("PREFIX = "):source.index("REQUESTS = ")]
    namespace: dict = {}
    exec(block, namespace)
    assert namespace["PROMPTS"] == prompts
    # Without a long common prefix nothing is factored out.
    assert "PREFIX" not in repro_source(spec("mismatch", "smollm2"))


@pytest.mark.parametrize("kind", ["crash", "mismatch", "batch_invariance"])
def test_a_block_pool_head_is_moved_before_each_generate_call_within_the_budget(kind):
    s = spec("mismatch" if kind == "batch_invariance" else kind, "hybrid-tiny", "stale_state")
    if kind == "batch_invariance":
        s.expected = Expected("batch_invariance", 0.0, targets=4)
    s.case.block_pool_head = 0.8
    source = repro_source(s)
    compile(source, "repro.py", "exec")
    s.case.block_pool_head = None
    without = repro_source(s)
    assert budget_lines(source) - budget_lines(without) <= POOL_HEAD_LINES
    assert budget_lines(source) <= LINE_BUDGET[kind] + POOL_HEAD_LINES, budget_lines(source)
    assert "BLOCK_POOL_HEAD = 0.8" in source and "as a big cache would" in source
    body = source[source.index("def reproduce"):]
    # Every generate call of the script (the batch, each request alone) comes right after a move.
    assert body.count("move_pool_head(llm)") == body.count("llm.generate(") == 1
    assert body.index("move_pool_head(llm)") < body.index("llm.generate(")
    assert "move_pool_head" not in without and "BLOCK_POOL_HEAD" not in without


@pytest.mark.parametrize("kind", ["crash", "mismatch"])
def test_a_warm_up_is_run_first_on_the_same_engine_and_not_judged(kind):
    base = spec(kind, "smollm2")
    base.case.warmup, base.case.warmup_max_tokens = [Request(PROMPT[:40], 5, 0, 0)], 16
    source = repro_source(base)
    namespace = {}
    exec(compile(source, "repro.py", "exec"), namespace)
    assert namespace["WARMUP"] == [(PROMPT[:40], 5)] and namespace["WARMUP_MAX_TOKENS"] == 16
    body = source[source.index("def reproduce"):]
    # After the engine starts and before the judged requests.
    assert body.index("WARMUP") < body.index("for p, _ in REQUESTS")
    assert "WARMUP" not in repro_source(spec(kind, "smollm2"))
