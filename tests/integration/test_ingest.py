"""Bring your own run, end to end: one small run of the lab's own loop, written out by the tests in
each framework's field names and file layout, ingested back; verdicts must match the original
run's, each planted pipeline fault must be named, and a clean export must give no diagnosis."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rollout_lab.ingest.diagnose import diagnose
from rollout_lab.ingest.sequence import ExportedSequence, GenericWriter
from rollout_lab.ingest.writer import ingest
from rollout_lab.loop import run
from rollout_lab.models import resolve_model
from rollout_lab.noise_floor import measure
from rollout_lab.records import read_records, read_requests, read_summary

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory, ray_session, compose):
    """Two RL steps of llama-tiny, lr 1e-3 so step 1's policy differs from the checkpoint's."""
    cfg = compose("model=llama-tiny", "loop.steps=2", "workload.num_prompts=4", "workload.samples_per_prompt=2",
                  "workload.max_tokens=12", "trainer.learning_rate=1e-3", "workload.reward=even_tokens", "logger.mode=disabled")
    cfg.run_dir = str(tmp_path_factory.mktemp("lab_run"))
    result = run(cfg)
    assert result.status == "ok", result.crash
    return Path(cfg.run_dir)


def lab_sequences(run_dir: Path) -> list[ExportedSequence]:
    """The lab run's completions, both sides, in step order: what every fixture export is written from."""
    frame = read_records(run_dir).to_pandas().sort_values(["step", "worker", "request_id", "position"])
    requests = {(r.step, r.worker, r.request_id): r for r in read_requests(run_dir)}
    out = []
    for (step, worker, request_id), rows in frame.groupby(["step", "worker", "request_id"], sort=False):
        r = requests[(step, worker, request_id)]
        out.append(ExportedSequence(step=int(step), prompt_token_ids=r.prompt_token_ids, token_ids=rows.token_id.tolist(),
                                    sampler_logprobs=rows.sampler_logprob.tolist(), trainer_logprobs=rows.trainer_logprob.tolist(),
                                    reward=float(rows.reward.iloc[0]), worker=int(worker), request_id=request_id,
                                    prompt_index=r.prompt_index, sample_index=r.sample_index, seed=r.seed, weight_version=int(step),
                                    temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens))
    return out


def write_nemo_rl(sequences, out: Path) -> Path:
    """train_data_step{N}.jsonl: full sequences, padded, logprobs aligned with token_ids (0 on the prompt)."""
    out.mkdir(parents=True)
    for s in sequences:
        p, c, pad = len(s.prompt_token_ids), len(s.token_ids), 3
        line = {"token_ids": s.prompt_token_ids + s.token_ids + [0] * pad, "input_lengths": p + c,
                "token_loss_mask": [0] * p + [1] * c + [0] * pad, "generation_logprobs": [0.0] * p + s.sampler_logprobs + [0.0] * pad,
                "prev_logprobs": [0.0] * p + s.trainer_logprobs + [0.0] * pad, "rewards": s.reward, "advantages": [0.0] * (p + c + pad)}
        with (out / f"train_data_step{s.step}.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
    return out


def write_prime_rl(sequences, out: Path) -> Path:
    """token_exports/step_N/rank_R.jsonl, two sequences packed per row, a STABLE marker per step."""
    for step in sorted({s.step for s in sequences}):
        step_dir = out / "token_exports" / f"step_{step}"
        step_dir.mkdir(parents=True)
        mine = [s for s in sequences if s.step == step]
        with (step_dir / "rank_0.jsonl").open("w") as f:
            for pair in (mine[i : i + 2] for i in range(0, len(mine), 2)):
                row = {"schema_version": 1, "step": step, "rank": 0, "run_id": "fixture", "token_ids": [], "position_ids": [],
                       "loss_mask": [], "inference_logprobs": [], "trainer_logprobs": []}
                for s in pair:
                    p, c = len(s.prompt_token_ids), len(s.token_ids)
                    row["token_ids"] += s.prompt_token_ids + s.token_ids
                    row["position_ids"] += list(range(p + c))
                    row["loss_mask"] += [0] * p + [1] * c
                    row["inference_logprobs"] += [0.0] * p + s.sampler_logprobs
                    row["trainer_logprobs"] += [0.0] * p + s.trainer_logprobs
                f.write(json.dumps(row) + "\n")
        (step_dir / "STABLE").touch()
    return out


def write_slime(sequences, out: Path) -> Path:
    """rollout_{id}.pt: the Sample dicts of --save-debug-rollout-data (no trainer side)."""
    out.mkdir(parents=True)
    for step in sorted({s.step for s in sequences}):
        samples = [{"tokens": s.prompt_token_ids + s.token_ids, "response_length": len(s.token_ids), "loss_mask": [1] * len(s.token_ids),
                    "rollout_log_probs": s.sampler_logprobs, "reward": s.reward, "weight_versions": [str(s.weight_version)],
                    "prefix_cache_info": {"cached_tokens": 0}, "index": int(s.request_id), "group_index": s.prompt_index}
                   for s in sequences if s.step == step]
        torch.save({"rollout_id": step, "samples": samples}, out / f"rollout_{step}.pt")
    return out


def write_generic(sequences, out: Path) -> Path:
    with GenericWriter(out, rows_per_group=4) as writer:
        for s in sequences:
            writer.write(s)
    return out


def write_verl(sequences, out: Path, tokenizer) -> Path:
    """{step}.jsonl: decoded text and the score, nothing else."""
    out.mkdir(parents=True)
    for s in sequences:
        with (out / f"{s.step}.jsonl").open("a") as f:
            f.write(json.dumps({"input": tokenizer.decode(s.prompt_token_ids), "output": tokenizer.decode(s.token_ids),
                                "score": s.reward, "step": s.step}) + "\n")
    return out


def assert_same_verdict(original: Path, ingested: Path, exact: bool = True):
    a, b = read_summary(original), read_summary(ingested)
    assert b.status == "ok" and b.num_tokens == a.num_tokens
    assert b.spike_fraction == a.spike_fraction == 0.0
    assert b.spike_threshold == a.spike_threshold
    if exact:
        assert b.abs_diff_max == a.abs_diff_max and b.abs_diff_mean == pytest.approx(a.abs_diff_mean)
    report = diagnose(ingested)
    assert report.findings == [] and report.remaining == 0


EXPORTS = {"nemo-rl": write_nemo_rl, "prime-rl": write_prime_rl,
           "generic": lambda seqs, out: write_generic(seqs, out.with_suffix(".jsonl"))}


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_export_ingests_to_the_original_verdict(lab_run, tmp_path, fmt):
    path = EXPORTS[fmt](lab_sequences(lab_run), tmp_path / "export")
    result, record = ingest(fmt, path, "llama-tiny", tmp_path / "run", logger_mode="disabled", progress=False)
    assert record.sampler_side == record.trainer_side == "export"
    assert record.steps == [0, 1]
    assert_same_verdict(lab_run, tmp_path / "run")
    original, ingested = read_records(lab_run).to_pandas(), read_records(tmp_path / "run").to_pandas()
    # Formats without request ids number prompts per step: tokens are matched by what they are.
    merged = original.merge(ingested, on=["step", "position", "token_id", "sampler_logprob"], suffixes=("", "_in"))
    assert len(merged) == len(original)
    assert (merged.trainer_logprob == merged.trainer_logprob_in).all() and (merged.prompt_len == merged.prompt_len_in).all()


def test_generic_parquet_and_wandb(lab_run, tmp_path):
    path = write_generic(lab_sequences(lab_run), tmp_path / "export.parquet")
    result, _ = ingest("generic", path, "llama-tiny", tmp_path / "run", progress=False)
    assert_same_verdict(lab_run, tmp_path / "run")
    from rollout_lab.wandb_log import read_offline_run

    logged = read_offline_run(result.wandb_dir)
    assert [row["_step"] for row in logged["history"] if "mismatch/abs_diff_max" in row] == [0, 1]
    assert logged["summary"]["ingest/trainer_side"] == "export"
    # The minimizer's replay reads these: one sampling-param set per step, the run's own seeds.
    requests = read_requests(tmp_path / "run", 1)
    assert {r.seed for r in requests} == {r.seed for r in read_requests(lab_run, 1)}


def test_slime_computes_the_trainer_side(lab_run, tmp_path):
    # Step 0 only: --model is the checkpoint that step sampled with; later steps sampled later weights.
    step0 = [s for s in lab_sequences(lab_run) if s.step == 0]
    result, record = ingest("slime", write_slime(step0, tmp_path / "export"), "llama-tiny", tmp_path / "run",
                            logger_mode="disabled", progress=False)
    assert record.sampler_side == "export" and record.trainer_side.startswith("computed")
    table = read_records(tmp_path / "run").to_pandas()
    original = read_records(lab_run).to_pandas().query("step == 0")
    assert len(table) == len(original) and result.spike_fraction == 0.0
    # The float32 reference and the lab's float32 trainer agree to float noise on the same tokens.
    assert np.abs(np.sort(table.trainer_logprob.to_numpy()) - np.sort(original.trainer_logprob.to_numpy())).max() < 1e-4
    assert diagnose(tmp_path / "run").findings == []


def test_planted_fill_value_and_shift_are_named(lab_run, tmp_path):
    sequences = lab_sequences(lab_run)
    filled = 0
    for s in sequences[:6]:
        low = [i for i, t in enumerate(s.trainer_logprobs) if t < math.log(0.5)]
        s.sampler_logprobs[low[0]] = 0.0
        filled += 1
    write_generic(sequences, tmp_path / "filled.jsonl")
    ingest("generic", tmp_path / "filled.jsonl", "llama-tiny", tmp_path / "filled", logger_mode="disabled", progress=False)
    report = diagnose(tmp_path / "filled")
    assert [f.name for f in report.findings] == ["fill_value"] and report.findings[0].tokens == filled
    assert report.remaining == 0

    shifted = lab_sequences(lab_run)
    for s in shifted:
        s.sampler_logprobs = s.sampler_logprobs[1:] + [s.trainer_logprobs[-1]]
    ingest("prime-rl", write_prime_rl(shifted, tmp_path / "shift_export"), "llama-tiny", tmp_path / "shift",
           logger_mode="disabled", progress=False)
    report = diagnose(tmp_path / "shift")
    assert "shift_by_one" in [f.name for f in report.findings] and report.remaining == 0


def _top_p_logprobs(model, s: ExportedSequence, top_p: float) -> list[float]:
    """The sampled tokens' logprobs under the model's distribution truncated to top_p and renormalized."""
    ids = torch.tensor([s.prompt_token_ids + s.token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(s.prompt_token_ids) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, -1)
    probs, _ = torch.sort(logprobs.exp(), descending=True)
    keep = (torch.cumsum(probs, -1) - probs) < top_p
    kept_mass = (probs * keep).sum(-1)
    return (logprobs.gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0] - kept_mass.log()).tolist()


def test_planted_truncation_and_stale_weights_are_named(lab_run, tmp_path):
    from rollout_lab.reference import load_reference, reference_logprobs

    model = load_reference(resolve_model("llama-tiny"))
    truncated = lab_sequences(lab_run)
    for s in truncated:
        # Both sides from one policy (the checkpoint's), the sampler's truncated to top_p 0.8.
        s.trainer_logprobs = _top_p_logprobs(model, s, 1.0)
        s.sampler_logprobs, s.top_p = _top_p_logprobs(model, s, 0.8), 0.8
    ingest("nemo-rl", write_nemo_rl(truncated, tmp_path / "trunc_export"), "llama-tiny", tmp_path / "trunc",
           logger_mode="disabled", progress=False)
    report = diagnose(tmp_path / "trunc")
    assert "truncated_sampling" in [f.name for f in report.findings] and report.remaining == 0

    # Step 1 sampled by the checkpoint's weights (one sync behind) while the trainer scored with step 1's.
    stale = lab_sequences(lab_run)
    behind = [s for s in stale if s.step == 1]
    for s, logprobs in zip(behind, reference_logprobs(model, [(s.prompt_token_ids, s.token_ids) for s in behind])):
        s.sampler_logprobs, s.weight_version = logprobs, 0
    write_generic(stale, tmp_path / "stale.jsonl")
    ingest("generic", tmp_path / "stale.jsonl", "llama-tiny", tmp_path / "stale", logger_mode="disabled", progress=False)
    report = diagnose(tmp_path / "stale")
    assert [f.name for f in report.findings] == ["stale_weights"] and report.remaining == 0
    assert "weight_version older than their step" in report.findings[0].evidence[0]


def test_noise_floor_and_trainer_variance(lab_run, tmp_path):
    # A bfloat16 trainer against a float32 sampler: the mismatch the trainer's own batching also makes.
    from transformers import AutoModelForCausalLM

    from rollout_lab.reference import reference_logprobs

    bf16 = AutoModelForCausalLM.from_pretrained(resolve_model("llama-tiny"), dtype=torch.bfloat16).eval()
    # Step 0 only: the checkpoint sampled it, so bfloat16 rounding is the sides' only difference.
    sequences = [s for s in lab_sequences(lab_run) if s.step == 0]
    for s, logprobs in zip(sequences, reference_logprobs(bf16, [(s.prompt_token_ids, s.token_ids) for s in sequences], batch_tokens=1)):
        s.trainer_logprobs = logprobs
    write_generic(sequences, tmp_path / "bf16.jsonl")
    ingest("generic", tmp_path / "bf16.jsonl", "llama-tiny", tmp_path / "bf16", logger_mode="disabled", progress=False)
    # vLLM CPU's kernels and this trainer on CPU are batch-invariant (1 vs 8 per forward: 0.0), so the floor
    # here is the trainer's own dtype: bfloat16 against float32 on the same tokens.
    assert measure(tmp_path / "bf16", sequences=4, dtype="bfloat16").abs_diff_max == 0.0
    floor = measure(tmp_path / "bf16", sequences=16, dtype="bfloat16", other_dtype="float32")
    assert floor.abs_diff_max > 1e-3 and floor.tokens > 0
    report = diagnose(tmp_path / "bf16")
    assert [f.name for f in report.findings] == ["trainer_variance"]
    assert report.floor["abs_diff_max"] == floor.abs_diff_max
    # The lab's own float32 run: its trainer against itself stays well under the float32 threshold.
    own = measure(lab_run, sequences=8)
    assert own.abs_diff_max < 1e-4


def test_cli_with_a_relative_path_and_another_directory(lab_run, tmp_path):
    write_prime_rl(lab_sequences(lab_run), tmp_path / "export")
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "rollout_lab.ingest", "prime-rl", "export", "--model", "llama-tiny", "--out", "run",
                           "--noise-floor-sequences", "4", "--split-by", "step", "--wandb", "disabled"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sampler side: export" in done.stdout and "for the engine: 0 flagged tokens" in done.stdout
    assert (tmp_path / "run" / "DIAGNOSIS.md").exists() and (tmp_path / "run" / "noise_floor.json").exists()
    assert (tmp_path / "run" / "by_step" / "SWEEP_REPORT.md").exists()
    bad = subprocess.run([sys.executable, "-m", "rollout_lab.ingest", "slime", "nowhere", "--model", "llama-tiny"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "rollout_lab.ingest: nowhere does not exist"


def test_verl_text_is_tokenized_and_both_sides_computed(lab_run, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("llama-tiny"))
    step0 = [s for s in lab_sequences(lab_run) if s.step == 0]
    engine_yaml = tmp_path / "engine.yaml"
    engine_yaml.write_text("engine:\n  dtype: float32\n  max_model_len: 256\n")
    result, record = ingest("verl", write_verl(step0, tmp_path / "export", tokenizer), "llama-tiny", tmp_path / "run",
                            engine_config=engine_yaml, logger_mode="disabled", progress=False)
    assert record.sampler_side.startswith("replayed") and record.trainer_side.startswith("computed")
    # vLLM's prefill and the float32 reference on the re-tokenized text: clean, as the run was.
    assert result.status == "ok" and result.num_tokens > 0 and result.spike_fraction == 0.0
    assert diagnose(tmp_path / "run").findings == []
