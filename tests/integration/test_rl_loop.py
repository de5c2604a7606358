"""The main job end to end on the real engine, real Ray and a real transformers trainer."""
import json

import numpy as np
import pytest

from rollout_lab.engine import runner_label
from rollout_lab.loop import run
from rollout_lab.records import read_records, read_summary
from rollout_lab.tolerances import tolerance
from rollout_lab.wandb_log import read_offline_run

pytestmark = pytest.mark.integration


def short_job(compose, run_dir, *overrides):
    """The default job as `python -m rollout_lab` composes it, 2 steps of 4 prompts x 2 samples x 16
    tokens; lr 1e-4 so the probe sees the weights move."""
    cfg = compose("loop.steps=2", "workload.num_prompts=4", "workload.samples_per_prompt=2", "workload.max_tokens=16",
                  "trainer.learning_rate=1e-4", *overrides)
    cfg.run_dir = str(run_dir)
    return cfg


def test_float32_run_records_every_token_and_agrees(tmp_path, ray_session, compose):
    result = run(short_job(compose, tmp_path))
    assert result.status == "ok", result.crash
    assert result.steps_completed == 2

    table = read_records(tmp_path)
    assert table.num_rows == result.num_tokens > 0
    assert set(table.column("step").to_pylist()) == {0, 1}
    assert len(set(zip(table.column("step").to_pylist(), table.column("request_id").to_pylist()))) == 2 * 4 * 2
    sampler, trainer = table.column("sampler_logprob").to_numpy(), table.column("trainer_logprob").to_numpy()
    assert np.all(sampler <= 0) and np.all(trainer <= 0)
    float32 = tolerance("float32")
    assert np.max(np.abs(sampler - trainer)) <= float32.spike_threshold
    assert result.spike_fraction == 0.0

    # The weights really moved, and vLLM follows them after each sync.
    assert result.weight_sync_max_diff <= float32.weight_sync
    assert result.policy_change > float32.weight_sync

    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(m["abs_diff_max"] <= float32.spike_threshold for m in metrics)

    wandb = read_offline_run(result.wandb_dir)
    logged = [row for row in wandb["history"] if "mismatch/abs_diff_max" in row]
    assert [row["_step"] for row in logged] == [0, 1]
    assert logged[0]["mismatch/abs_diff_max"] == pytest.approx(metrics[0]["abs_diff_max"])
    assert logged[0]["mismatch/worst_tokens/_type"] == "table-file"
    assert wandb["summary"]["status"] == "ok"
    summary = read_summary(tmp_path)
    assert summary.status == "ok"
    # The model runner and attention backends the engine's worker reported, beside the versions.
    module = summary.environment["model_runner"].rsplit(".", 1)[0]
    assert summary.environment["model_runner_label"] == runner_label(module) is not None
    assert summary.environment["attention_backends"] and all(summary.environment["attention_backends"])


@pytest.mark.slow  # 77 s alone: a second engine process; the weight sync itself is checked by the float32 job above
def test_an_engine_core_in_its_own_process_takes_each_weight_sync(tmp_path, ray_session, compose):
    """engine.multiprocessing=true: collective_rpc crosses into vLLM's engine-core process through msgpack."""
    result = run(short_job(compose, tmp_path, "model=llama-tiny", "engine.multiprocessing=true", "workload.reward=even_tokens"))
    assert result.status == "ok", result.crash
    float32 = tolerance("float32")
    assert result.weight_sync_exercised and result.weight_sync_max_diff <= float32.weight_sync < result.policy_change


def test_engine_exception_during_a_step_is_a_crash_result(tmp_path, ray_session, compose):
    # The chat-formatted prompts are ~40 tokens: a 24-token context makes vLLM reject them.
    result = run(short_job(compose, tmp_path, "workload.max_tokens=4", "engine.max_model_len=24"))
    assert result.status == "crash"
    assert result.steps_completed == 0
    assert result.crash.phase == "generate" and result.crash.step == 0
    assert "maximum context length is 24 tokens" in result.crash.message
    assert any(frame.startswith("vllm/") for frame in result.crash.vllm_frames)
    assert read_summary(tmp_path).crash == result.crash
