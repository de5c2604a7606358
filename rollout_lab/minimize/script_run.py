"""The reproduce() of a repro.py, for each built-in oracle (each oracle's repro_check picks its own): how the script sends the case's requests to
the engine and judges what comes back (script.repro_source puts it between the case and the main block).

    Case + Expected -> reproduce_function() -> `def reproduce(args) -> (verdict, why)`
    Expected's oracle -> exception_block() -> how the main block judges an exception
"""
from __future__ import annotations

import textwrap
from typing import Optional

from rollout_lab.minimize.standalone import Case, Expected, completed, is_scheduled
from rollout_lab.oracles.records import SAME_CLASS
from rollout_lab.tolerances import clean_agreement


def _comment(text: str) -> str:
    return textwrap.fill(text, 100, initial_indent="# ", subsequent_indent="# ")


def is_seeded(case: Case) -> bool:
    """Whether the requests' seeds can change the case: not at temperature 0 (greedy)."""
    return case.temperature != 0


def sampling(case: Case) -> dict:
    """The SamplingParams a case needs: max_tokens and what is off vLLM's defaults (top_p/top_k mean nothing when greedy)."""
    params = {"max_tokens": case.max_tokens, "temperature": case.temperature}
    if case.temperature != 0:
        params |= {k: v for k, v in (("top_p", case.top_p), ("top_k", case.top_k)) if v != {"top_p": 1.0, "top_k": -1}[k]}
    return params


def _params(case: Case, requests: str, logprobs: bool) -> str:
    """The expression of one SamplingParams per request of `requests` (a name in the script)."""
    extra = "logprobs=0, " if logprobs else ""
    if is_seeded(case):
        return f"[vllm.SamplingParams(seed=seed, {extra}detokenize=False, **SAMPLING) for _, seed in {requests}]"
    return f"[vllm.SamplingParams({extra}detokenize=False, **SAMPLING) for _ in {requests}]"


def _prompts(case: Case, requests: str) -> str:
    """The expression of the prompts of `requests`, in order."""
    each = "p, _" if is_seeded(case) else "p"
    return f'[{{"prompt_token_ids": PROMPTS[p]}} for {each} in {requests}]'


def _sample(case: Case, requests: str) -> str:
    """The call that samples `requests` with `params`: one generate call, or the engine stepped on SCHEDULE."""
    if is_scheduled(case.requests):
        return f"run_schedule(llm, {_prompts(case, requests)}, params, SCHEDULE)"
    return f"llm.generate({_prompts(case, requests)}, params, use_tqdm=False)"


# The engine stepped on a schedule, as the minimizer replays it (rollout_lab/stepping.py: the same clock).
SCHEDULE_LOOP = '''

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
    return [finished[i] for i in range(len(prompts)) if schedule[i][1] is None]  # one given an abort step: none, done or not
'''


# What vLLM chose for the engine, read in its worker (the in-process engine core takes a plain function):
# the attributes are the same on vLLM 0.25 and 0.32 (rollout_lab/engine.py reads the runner the same way).
ENGINE_CHOICES = '''

def engine_choices(worker) -> str:
    runner, config = worker.model_runner, worker.vllm_config
    backends = sorted({g.backend.get_name() for groups in getattr(runner, "attn_groups", None) or [] for g in groups})
    cache, scheduler = config.cache_config, config.scheduler_config
    return (f"vLLM chose: {type(runner).__module__}.{type(runner).__name__}, attention {backends}, "
            f"block_size {cache.block_size}, mamba_cache_mode {getattr(cache, 'mamba_cache_mode', '-')}, "
            f"prefix caching {cache.enable_prefix_caching}, max_num_batched_tokens {scheduler.max_num_batched_tokens}, "
            f"chunked prefill {scheduler.enable_chunked_prefill}")
'''
_PRINT_CHOICES = "\n    print(llm.collective_rpc(engine_choices)[0])"


def _crash_site(expected: Expected) -> Optional[str]:
    """The innermost vLLM function of the crash key (None: the crash had no vLLM frame)."""
    frames = expected.crash_key.split("@", 1)[1]
    return None if frames == "no-vllm-frame" else frames.split("|")[-1].rsplit(":", 1)[-1]


_VERSIONS = '''    print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__, platform.platform())'''


def crash_run(case: Case, expected: Expected, model: str, install: str) -> str:
    exc_type, site = expected.crash_key.split("@", 1)[0], _crash_site(expected)
    return f'''CRASH = ({exc_type!r}, {site!r})  # the failure: this exception, raised in this vLLM function

def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
{_VERSIONS}
    llm = vllm.LLM(model={model}, skip_tokenizer_init=True, **ENGINE_ARGS){_PRINT_CHOICES}{install}
    params = {_params(case, "REQUESTS", False)}
    {_sample(case, "REQUESTS")}
    return "NOT REPRODUCED", f"{"the schedule ran its {len(REQUESTS)} request(s)" if is_scheduled(case.requests) else "generate returned {len(REQUESTS)} completion(s)"} without an error"
'''


# What each request class of standalone.request_class means, in a repro's words.
CLASS_TEXT = {
    "preempted": "preempted (every flagged request preempted or a prefix-cache hit, one preempted at least)",
    "prefix_cached": "prefix_cached (every flagged request a prefix-cache hit, none preempted)",
    "any": "any (some flagged request neither preempted nor a prefix-cache hit)",
}


def mismatch_run(case: Case, expected: Expected, model: str, install: str) -> str:
    return f'''{_comment("The failure: sampled tokens whose vLLM logprob is off transformers' float32 one by > TOLERANCE "
           f"({clean_agreement(str(case.engine_args.get('dtype')), case.engine_args.get('kv_cache_dtype'))}), "
           f"on requests of CLASSES: {CLASS_TEXT[expected.request_class]}.")}
TOLERANCE, CLASSES = {expected.spike_threshold!r}, {SAME_CLASS[expected.request_class]!r}

def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
    from transformers import AutoModelForCausalLM
{_VERSIONS}
    model = {model}
    llm = vllm.LLM(model=model, skip_tokenizer_init=True, **ENGINE_ARGS){_PRINT_CHOICES}{install}
    params = {_params(case, "REQUESTS", True)}
    outputs = {_sample(case, "REQUESTS")}
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    print("request  preemptions  cached tokens  tokens  flagged  first bad position  max |vLLM - transformers|")
    flagged, bad_tokens = [], 0
    for i, out in enumerate(outputs):
        prompt, completion = list(out.prompt_token_ids), out.outputs[0]
        with torch.no_grad():  # teacher forcing: the logits at position t predict token t + 1
            logits = reference(torch.tensor([prompt + list(completion.token_ids)])).logits[0, len(prompt) - 1 : -1]
        ref = logits.float().log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0].tolist()
        diffs = [abs(lp[t].logprob - r) for lp, t, r in zip(completion.logprobs, completion.token_ids, ref)]
        bad = [position for position, d in enumerate(diffs) if d > TOLERANCE]
        # None: this vLLM keeps no per-request count (before 0.30), which is unknown, not 0.
        preemptions, cached = getattr(out.metrics, "num_preemptions", None), int(out.num_cached_tokens or 0)
        print(f"{{i:>7}} {{'?' if preemptions is None else preemptions:>12}} {{cached:>14}} {{len(diffs):>7}} {{len(bad):>8}} "
              f"{{bad[0] if bad else '-':>19}} {{max(diffs, default=0):>26.3g}}")
        bad_tokens += len(bad)
        flagged += [(preemptions, cached)] if bad else []
    if not flagged:
        return "NOT REPRODUCED", f"all {{len(outputs)}} requests' sampled logprobs within {{TOLERANCE}} of transformers"
    kind = ("any" if any(not p and c == 0 for p, c in flagged)
            else "preempted" if any(p for p, _ in flagged) else "prefix_cached")
    found = f"{{bad_tokens}} tokens of {{len(flagged)}}/{{len(outputs)}} requests ({{kind}}) off by > {{TOLERANCE}}"
    return ("REPRODUCED", found) if kind in CLASSES else ("NOT REPRODUCED", f"{{found}}, not on {{CLASSES}} requests")
'''


def _batch_sample(case: Case, head: str) -> str:
    """The first lines of the batch repro's run(): the requests in one generate call, or stepped on a schedule."""
    if not is_scheduled(case.requests):
        return f'''    def run(requests):  # (sampled tokens, their logprobs) of each request, the requests in one generate call
        params = {_params(case, "requests", True)}{head}
        outputs = llm.generate({_prompts(case, "requests")}, params, use_tqdm=False)'''
    return f'''    def run(requests, schedule=None):  # (sampled tokens, their logprobs): stepped on `schedule`, else one generate call
        params = {_params(case, "requests", True)}{head}
        prompts = {_prompts(case, "requests")}
        outputs = llm.generate(prompts, params, use_tqdm=False) if schedule is None else run_schedule(llm, prompts, params, schedule)'''


def batch_run(case: Case, expected: Expected, model: str, install: str) -> str:
    scheduled = is_scheduled(case.requests)
    targets = min(expected.targets, len(completed(case)))
    head = "\n        move_pool_head(llm)" if case.block_pool_head is not None else ""
    # A schedule's batch leaves out the requests it aborts: the targets are the first of the others (KEPT).
    kept = ("\n    KEPT = [r for r, (_, abort) in zip(REQUESTS, SCHEDULE) if abort is None]  # the requests not aborted"
            if scheduled else "")
    return f'''{_comment("The failure: one of the first TARGETS requests, run again alone on the same engine after the "
                         "batch, gives other sampled tokens or sampled-token logprobs than in the batch (bitwise).")}
TARGETS = {targets!r}

def reproduce(args) -> tuple[str, str]:
    import torch, transformers, vllm
{_VERSIONS}
    llm = vllm.LLM(model={model}, skip_tokenizer_init=True, **ENGINE_ARGS){_PRINT_CHOICES}{install}

{_batch_sample(case, head)}
        return [(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]) for c in (o.outputs[0] for o in outputs)]

    batch = run({"REQUESTS, SCHEDULE" if scheduled else "REQUESTS"}){kept}
    print("request  tokens  first other token  bitwise-equal logprobs  max |batch - alone|")
    differ, worst, firsts = 0, 0.0, []
    for i in range(TARGETS):
        (tokens, logprobs), (alone, alone_logprobs) = batch[i], run([{"KEPT" if scheduled else "REQUESTS"}[i]])[0]
        first = next((p for p, (a, b) in enumerate(zip(tokens, alone)) if a != b),
                     None if len(tokens) == len(alone) else min(len(tokens), len(alone)))
        same = list(zip(logprobs, alone_logprobs))[: len(tokens) if first is None else first]  # the same tokens
        diffs, equal = [abs(a - b) for a, b in same], sum(a == b for a, b in same)
        print(f"{{i:>7}} {{len(tokens):>7}} {{'-' if first is None else first:>18}} {{f'{{equal}}/{{len(same)}}':>23}} "
              f"{{max(diffs, default=0.0):>20.3g}}")
        differ += first is not None or equal < len(same)
        worst, firsts = max([worst, *diffs]), firsts + ([] if first is None else [first])
    if not differ:
        return "NOT REPRODUCED", f"all {{TARGETS}} target requests bitwise identical alone and in the batch of {{len(REQUESTS)}}"
    found = f"{{differ}}/{{TARGETS}} target requests differ alone vs in the batch of {{len(REQUESTS)}}, max |diff| {{worst:.3g}}"
    return "REPRODUCED", found + (f", first other token at position {{min(firsts)}}" if firsts else "")
'''


# How the main block judges an exception: a crash repro's is the bug when it is CRASH; anything
# else unexpected is no verdict on the bug.
_CRASH_VERDICT = '''    except Exception as exc:  # the crash, or anything unexpected
        print(trace := "".join(traceback.format_exception(exc)), end="")  # chained exceptions included
        crashed = type(exc).__name__ == CRASH[0] and (CRASH[1] is None or f", in {CRASH[1]}\\n" in trace)
        verdict, why = ("REPRODUCED" if crashed else "CANNOT RUN"), f"{type(exc).__name__}: {exc}"'''
_NO_VERDICT = '''    except Exception as exc:  # anything unexpected is no verdict on the bug
        traceback.print_exc()
        verdict, why = "CANNOT RUN", f"{type(exc).__name__}: {exc}"'''


def reproduce_function(case: Case, expected: Expected, model: str, install: str) -> str:
    """The text of reproduce(): start the engine on `model`, run `install` (lines after the start), send the
    case's requests and judge them for the failure `expected` keeps (its oracle's repro check)."""
    return expected.oracle.repro_check(case, expected, model, install)


def exception_block(expected: Expected) -> str:
    """The main block's `except` clause: a crash repro's exception is the bug when it is CRASH."""
    return _CRASH_VERDICT if expected.oracle.raises else _NO_VERDICT
