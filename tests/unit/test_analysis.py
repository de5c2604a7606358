"""Sweep analysis on synthetic sweep dirs with hand-made records: a structure change, pure
scaling, nothing; crashes; missing and corrupted runs; the report and the command line."""
import json
import time

import numpy as np
import pyarrow as pa
import pytest

from rollout_lab.analysis.report import analyze_sweep
from rollout_lab.analysis.signature import read_sweep, run_signature
from rollout_lab.analysis.verdict import variable_verdicts
from rollout_lab.analyze import main as analyze_main
from rollout_lab.records import TOKEN_SCHEMA, write_step

STEPS, REQUESTS, TOKENS = 2, 24, 16
THRESHOLD = 1e-3


def write_run(run_dir, config: dict, abs_diff_fn, seed=0, kv_offset=0, status="ok", crash=None, steps=STEPS):
    """A run dir like loop.run writes: config.json, summary.json, one parquet per step.

    abs_diff_fn(rng, step, request, positions, kv_blocks) -> |sampler - trainer| per token.
    kv_offset shifts the block ids every request holds, as a bigger cache would.
    """
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    full_config = {"engine": {"kv_cache_memory_bytes": None, "dtype": "float32"}, "workload": {"num_prompts": 12},
                   "fault": {"name": None, "params": {}}, "logger": {"mode": "disabled", "group": None},
                   "run_name": "synthetic", "run_dir": str(run_dir)}
    for key, value in config.items():
        section, name = key.split(".", 1)
        if section == "fault" and name.startswith("params."):
            full_config["fault"]["params"][name.split(".", 1)[1]] = value
        else:
            full_config[section][name] = value
    (run_dir / "config.json").write_text(json.dumps(full_config))
    for step in range(steps):
        rows = {name: [] for name in TOKEN_SCHEMA.names}
        for request in range(REQUESTS):
            positions = np.arange(TOKENS)
            # Two 8-token blocks per request, handed out in request order from kv_offset on.
            kv_blocks = kv_offset + 2 * request + positions // 8
            diffs = abs_diff_fn(rng, step, request, positions, kv_blocks)
            sampler = -rng.uniform(0.1, 3.0, TOKENS)
            rows["run_id"] += ["synthetic"] * TOKENS
            rows["step"] += [step] * TOKENS
            rows["worker"] += [0] * TOKENS
            rows["request_id"] += [str(request)] * TOKENS
            rows["prompt_index"] += [request // 2] * TOKENS
            rows["sample_index"] += [request % 2] * TOKENS
            rows["position"] += positions.tolist()
            rows["prompt_len"] += [40] * TOKENS
            rows["token_id"] += [7] * TOKENS
            rows["sampler_logprob"] += sampler.tolist()
            rows["trainer_logprob"] += (sampler - diffs).tolist()
            rows["abs_diff"] += diffs.tolist()
            rows["reward"] += [0.1] * TOKENS
            rows["num_cached_tokens"] += [0] * TOKENS
            rows["num_preemptions"] += [0] * TOKENS
            rows["kv_block"] += kv_blocks.tolist()
            rows["state_slot"] += [None] * TOKENS
            rows["preemptions_before"] += [0] * TOKENS
        write_step(run_dir, step, pa.table(rows, schema=TOKEN_SCHEMA))
    summary = {"status": status, "spike_threshold": THRESHOLD, "crash": crash}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def floor_noise(rng, n):
    """float32 disagreement of a clean run: ~1e-5."""
    return 10 ** rng.normal(-5, 0.3, n)


def overflow(threshold_block):
    """index_overflow-like: tokens read through a block id >= threshold are badly wrong."""
    def abs_diff(rng, step, request, positions, kv_blocks):
        bad = kv_blocks >= threshold_block
        return np.where(bad, 10 ** rng.normal(0.3, 0.3, positions.size), floor_noise(rng, positions.size))
    return abs_diff


def noise(scale):
    """logit_noise-like: every token off by scale x a position-dependent factor x |N(0,1)|."""
    def abs_diff(rng, step, request, positions, kv_blocks):
        return scale * (1 + positions / 8) * np.abs(rng.normal(size=positions.size)) + floor_noise(rng, positions.size)
    return abs_diff


def clean(rng, step, request, positions, kv_blocks):
    return floor_noise(rng, positions.size)


CACHE = "engine.kv_cache_memory_bytes"


def verdict_of(sweep_dir, variable):
    verdicts = {v.variable: v for v in variable_verdicts(read_sweep(sweep_dir).runs)}
    return verdicts[variable]


def test_signature_of_a_run_counts_spikes_where_and_how_bad(tmp_path):
    # Requests 20..23 hold blocks 40..47 >= 40: 4 of 24 requests fail, from step 0 on.
    write_run(tmp_path / "0", {CACHE: 1}, overflow(40))
    sig = run_signature(tmp_path / "0")
    assert sig.status == "ok" and sig.outcome == "silent mismatch" and sig.crash_key is None
    assert sig.num_tokens == STEPS * REQUESTS * TOKENS and sig.num_requests == STEPS * REQUESTS
    assert sig.num_spikes == STEPS * 4 * TOKENS
    assert sig.spike_rate == pytest.approx(4 / 24)
    assert sig.affected_request_share == pytest.approx(4 / 24)
    assert sig.first_spike_step == 0
    # 10% of 48 requests -> the top 5 requests hold 5 of the 8 failing requests' spikes.
    assert sig.spike_concentration == pytest.approx(5 / 8)
    assert sig.abs_diff_quantiles["p50"] < 1e-4 < THRESHOLD < sig.abs_diff_quantiles["max"]
    where = {s.feature: s for s in sig.where}
    assert (where["kv_block"].low, where["kv_block"].high) == (40, 47)
    assert (where["position"].low, where["position"].high) == (0, 15)
    assert "state_slot" not in where  # instrumentation column left null


def test_structure_change_cache_size_decides_which_requests_fail(tmp_path):
    # A bigger cache hands out higher block ids: more requests cross the overflow threshold.
    for i, offset in enumerate([0, 16, 32, 48]):
        write_run(tmp_path / str(i), {CACHE: (i + 1) * 1000}, overflow(40), seed=i, kv_offset=offset)
    verdict = verdict_of(tmp_path, CACHE)
    assert verdict.verdict == "structural", verdict.tests
    moved = {t.feature for t in verdict.moved}
    assert {"shape", "affected_requests"} <= moved
    assert verdict.headline.kind == "structure" and verdict.headline.p_adjusted < 0.05


def test_pure_scaling_is_magnitude_only_even_when_block_ids_shift(tmp_path):
    for i, scale in enumerate([0.02, 0.05, 0.1, 0.2]):
        write_run(tmp_path / str(i), {"fault.params.scale": scale}, noise(scale), seed=i, kv_offset=16 * i)
    verdict = verdict_of(tmp_path, "fault.params.scale")
    assert verdict.verdict == "magnitude-only", [(t.feature, t.p_adjusted, t.effect_size) for t in verdict.tests]
    assert "magnitude" in {t.feature for t in verdict.moved}
    assert verdict.headline.feature == "magnitude" and verdict.headline.effect_size > 0.5
    assert verdict.sentence.startswith("fails alike at every value (silent mismatch) with the same shape; "
                                       "only its size moves with fault.params.scale (max |diff| ")
    assert verdict.sentence.endswith(": fault.params.scale scales the failure, it does not switch it on")


def test_same_failure_at_every_value_is_none(tmp_path):
    for i, prompts in enumerate([4, 8, 16, 32]):
        write_run(tmp_path / str(i), {"workload.num_prompts": prompts}, noise(0.05), seed=i)
    verdict = verdict_of(tmp_path, "workload.num_prompts")
    assert verdict.verdict == "none", [(t.feature, t.p_adjusted, t.effect_size) for t in verdict.tests]
    assert verdict.tests  # tested, and nothing moved


def test_clean_runs_are_none_without_testing(tmp_path):
    for i, prompts in enumerate([4, 8]):
        write_run(tmp_path / str(i), {"workload.num_prompts": prompts}, clean, seed=i)
    verdict = verdict_of(tmp_path, "workload.num_prompts")
    assert verdict.verdict == "none" and verdict.tests == []
    assert "no run failed" in verdict.reason


def test_crash_at_some_values_and_silent_at_others_is_structural(tmp_path):
    crash = {"key": "RuntimeError@vllm/v1/worker/gpu_model_runner.py:execute_model", "message": "boom", "step": 1}
    write_run(tmp_path / "0", {"engine.dtype": "float32"}, noise(0.05), seed=0)
    write_run(tmp_path / "1", {"engine.dtype": "bfloat16"}, noise(0.05), seed=1, status="crash", crash=crash, steps=1)
    verdict = verdict_of(tmp_path, "engine.dtype")
    assert verdict.verdict == "structural"
    outcome_test = next(t for t in verdict.tests if t.feature == "outcome")
    assert outcome_test.moved and outcome_test.p_value is None and outcome_test.effect_size == pytest.approx(1.0)
    assert verdict.sentence.startswith("ends differently with engine.dtype: ")
    sig = run_signature(tmp_path / "1")
    assert sig.outcome == "crash" and sig.crash_step == 1 and sig.num_tokens == REQUESTS * TOKENS

    # An engine that raised at start (not vLLM refusing its configuration) leaves no records:
    # still a crash run, with no tokens.
    crash = {"key": "ValueError@vllm/v1/core/kv_cache_utils.py:check_enough_kv_cache_memory", "message": "no memory", "step": None}
    write_run(tmp_path / "2", {"engine.dtype": "float16"}, noise(0.05), status="crash", crash=crash, steps=0)
    sig = run_signature(tmp_path / "2")
    assert sig.outcome == "crash" and sig.num_tokens == 0 and sig.tokens.empty
    assert verdict_of(tmp_path, "engine.dtype").verdict == "structural"


def test_a_weight_sync_mismatch_is_a_way_of_ending_too(tmp_path):
    # No token spikes anywhere, but the loop stopped on a sync mismatch at one value.
    write_run(tmp_path / "0", {"engine.dtype": "float32"}, clean, seed=0)
    write_run(tmp_path / "1", {"engine.dtype": "bfloat16"}, clean, seed=1, status="sync_mismatch", crash={"key": "WeightSyncError@no-vllm-frame"})
    assert run_signature(tmp_path / "1").outcome == "sync mismatch"
    verdict = verdict_of(tmp_path, "engine.dtype")
    assert verdict.verdict == "structural" and [t.feature for t in verdict.moved] == ["outcome"]
    assert verdict.sentence == "fails at engine.dtype = bfloat16 (clean at float32): sync mismatch at bfloat16"


def write_multirun_yaml(sweep_dir, values):
    (sweep_dir / "multirun.yaml").write_text(
        "hydra:\n  sweep:\n    dir: " + str(sweep_dir) + "\n    subdir: ${hydra.job.num}\n"
        f"  sweeper:\n    params:\n      {CACHE}: {','.join(map(str, values))}\n"
        "  overrides:\n    task:\n    - +sweep=cache_size\n"
    )


def test_missing_and_corrupted_runs_are_reported_and_the_rest_analyzed(tmp_path):
    values = [1000, 2000, 3000, 4000, 5000, 6000]
    write_multirun_yaml(tmp_path, values)
    for i, offset in enumerate([0, 16, 32, 48]):
        write_run(tmp_path / str(i), {CACHE: values[i]}, overflow(40), seed=i, kv_offset=offset)
    # Run 1: a damaged records file. Run 2: a torn summary.json. Run 4: the job died. Run 5: never ran.
    (tmp_path / "1" / "records" / "step_00001.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "2" / "summary.json").write_text('{"status": "ok", "spike_')
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "failure.txt").write_text("WorkerCrashedError: the worker died\n")

    report = analyze_sweep(tmp_path, wandb_mode="disabled")
    broken = {b.name: b.problem for b in report.broken}
    assert set(broken) == {"1", "2", "4", "5"}
    assert "corrupted" in broken["1"] and "step_00001.parquet" in broken["1"]
    assert "summary.json is corrupted" in broken["2"]
    assert broken["4"] == "job failed: WorkerCrashedError: the worker died"
    assert broken["5"] == "run dir missing"
    assert [r.name for r in report.runs] == ["0", "3"]
    assert report.verdicts[0].variable == CACHE and report.verdicts[0].verdict == "structural"

    text = (tmp_path / "SWEEP_REPORT.md").read_text()
    assert "## Runs not analyzed" in text and "run dir missing" in text
    assert f"| {CACHE} | structural |" in text
    data = json.loads((tmp_path / "sweep_report.json").read_text())
    assert data["verdicts"][0]["verdict"] == "structural" and len(data["broken"]) == 4
    assert report.plots and all(p.endswith(".png") for p in report.plots)
    assert (tmp_path / "analysis" / f"{CACHE}-shape.png").stat().st_size > 0


def test_report_goes_to_an_offline_wandb_run_in_the_sweep_group(tmp_path):
    from rollout_lab.wandb_log import read_offline_run

    for i, scale in enumerate([0.02, 0.2]):
        write_run(tmp_path / str(i), {"fault.params.scale": scale, "logger.group": "sweep-x"}, noise(scale), seed=i)
    report = analyze_sweep(tmp_path, wandb_mode="offline")
    assert report.wandb_dir.startswith(str(tmp_path / "analysis" / "wandb"))
    # W&B's service can still be writing the offline file when finish() returns.
    for _ in range(50):
        logged = read_offline_run(report.wandb_dir)
        if logged["summary"]:
            break
        time.sleep(0.2)
    assert logged["summary"]["verdict/fault.params.scale"] == "magnitude-only"
    assert logged["summary"]["runs_analyzed"] == 2
    assert any("sweep/verdicts" in "".join(row) for row in logged["history"])


def test_command_line_exits_2_on_a_missing_sweep_dir_and_writes_the_report(tmp_path, capsys):
    assert analyze_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for i, scale in enumerate([0.02, 0.05, 0.1]):
        write_run(tmp_path / str(i), {"fault.params.scale": scale}, noise(scale), seed=i)
    assert analyze_main([str(tmp_path), "--wandb", "disabled"]) == 0
    assert "magnitude-only" in capsys.readouterr().out
    assert (tmp_path / "SWEEP_REPORT.md").exists()
