"""The main job end to end on the real engine, real Ray and a real transformers trainer."""
import json

import numpy as np
import pytest

from rollout_lab.config import RunConfig
from rollout_lab.loop import run
from rollout_lab.records import read_records
from rollout_lab.wandb_log import read_offline_run

pytestmark = pytest.mark.integration


def small_config(run_dir, **workload) -> RunConfig:
    cfg = RunConfig(run_name="test", run_dir=str(run_dir))
    cfg.loop.steps = 2
    cfg.workload.num_prompts = 4
    cfg.workload.samples_per_prompt = 2
    cfg.workload.max_tokens = 16
    cfg.trainer.learning_rate = 1e-4
    for key, value in workload.items():
        setattr(cfg.workload, key, value)
    return cfg


def test_float32_run_records_every_token_and_agrees(tmp_path, ray_session):
    result = run(small_config(tmp_path))
    assert result.status == "ok", result.crash
    assert result.steps_completed == 2

    table = read_records(tmp_path)
    assert table.num_rows == result.num_tokens > 0
    assert set(table.column("step").to_pylist()) == {0, 1}
    assert len(set(zip(table.column("step").to_pylist(), table.column("request_id").to_pylist()))) == 2 * 4 * 2
    sampler, trainer = table.column("sampler_logprob").to_numpy(), table.column("trainer_logprob").to_numpy()
    assert np.all(sampler <= 0) and np.all(trainer <= 0)
    assert np.max(np.abs(sampler - trainer)) <= 1e-3
    assert result.spike_fraction == 0.0

    # The weights really moved, and vLLM follows them after each sync.
    assert result.weight_sync_max_diff <= 1e-3
    assert result.policy_change > 1e-3

    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(m["abs_diff_max"] <= 1e-3 for m in metrics)

    wandb = read_offline_run(result.wandb_dir)
    logged = [row for row in wandb["history"] if "mismatch/abs_diff_max" in row]
    assert [row["_step"] for row in logged] == [0, 1]
    assert logged[0]["mismatch/abs_diff_max"] == pytest.approx(metrics[0]["abs_diff_max"])
    assert logged[0]["mismatch/worst_tokens/_type"] == "table-file"
    assert wandb["summary"]["status"] == "ok"
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "ok"


def test_engine_exception_during_a_step_is_a_crash_result(tmp_path, ray_session):
    # The chat-formatted prompts are ~40 tokens: a 24-token context makes vLLM reject them.
    cfg = small_config(tmp_path, max_tokens=4)
    cfg.engine.max_model_len = 24
    result = run(cfg)
    assert result.status == "crash"
    assert result.steps_completed == 0
    assert result.crash["phase"] == "generate" and result.crash["step"] == 0
    assert "maximum context length is 24 tokens" in result.crash["message"]
    assert any(frame.startswith("vllm/") for frame in result.crash["vllm_frames"])
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "crash"
