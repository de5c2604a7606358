"""The console summary of `python -m rollout_lab`: the engine line names what ran."""
from rollout_lab.__main__ import print_summary
from rollout_lab.records import RunResult


def test_the_summary_names_the_model_runner_and_attention_backends_of_each_cache_group(capsys):
    result = RunResult("r", "runs/r", status="ok", spike_threshold=1e-3, reward_mean=0.0, environment={
        "engine": "vllm 0.25.0", "model_runner": "vllm.v1.worker.gpu.model_runner.GPUModelRunner",
        "model_runner_label": "v2", "attention_backends": [["MAMBA2_ATTN"], ["TRITON_ATTN", "FLASH_ATTN"]]})
    print_summary(result)
    out = " ".join(capsys.readouterr().out.split())
    assert "engine: vllm 0.25.0, model runner v2 (vllm.v1.worker.gpu.model_runner.GPUModelRunner), " \
           "attention MAMBA2_ATTN | TRITON_ATTN, FLASH_ATTN" in out


def test_a_run_whose_engine_never_started_prints_no_engine_line(capsys):
    print_summary(RunResult("r", "runs/r", status="crash", spike_threshold=1e-3, reward_mean=0.0, environment={"engine": "vllm 0.25.0"}))
    assert "model runner" not in capsys.readouterr().out
