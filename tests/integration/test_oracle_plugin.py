"""A new oracle through the public interface (conftest's toy_oracle: subclass Oracle, register it) is
minimized by the minimizer's CLI (its main, in this process, where the oracle is registered) to a
repro.py that carries the oracle's own check and reproduces in a fresh interpreter. The hunt's side
of the same oracle: tests/unit/test_oracles.py."""
import pytest

from rollout_lab.config import EngineConfig
from rollout_lab.minimize.handoff import CaseFile, MinimizedResult
from rollout_lab.minimize.standalone import Case, Expected, Request

pytestmark = pytest.mark.integration


def test_a_registered_toy_oracle_is_minimized_to_a_repro_that_reproduces_fresh(toy_oracle, tmp_path, capsys):
    from rollout_lab.minimize.__main__ import main as minimize_main

    # The CPU defaults the knob pass goes back to (knobs.knob_targets): no knob is left to reduce.
    args = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": EngineConfig.gpu_memory_utilization,
            "seed": 0, "disable_log_stats": False}
    case = Case("llama-tiny", args, [Request([100 + 7 * i + j for j in range(6)], 10 + i, i, 0) for i in range(3)], max_tokens=4)
    path = CaseFile("llama-tiny", case, Expected("unlikely_token", toy_oracle.floor), "3 seeded requests").write(tmp_path / "case.json")

    code = minimize_main([str(path), "--out", str(tmp_path / "repro"), "--name", "toy", "--calibration-runs", "1", "--confirm-only"])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "predicate: a sampled token whose vLLM logprob is below -1" in out
    assert "repro.py in a fresh process: REPRODUCED: 1 sampled tokens below -1.0" in out
    info = MinimizedResult.read(tmp_path / "repro" / "toy")
    assert info.after.startswith("1 prompts x 1 samples (1 requests), max_tokens 1, prompts <= 1 tokens"), info.after
    assert "FLOOR = -1.0" in (tmp_path / "repro" / "toy" / "repro.py").read_text()
