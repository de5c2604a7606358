"""The localizer as a user runs it (`python -m rollout_lab.localize <run_dir>`) on one-step runs of
planted faults, whose ground truth says where inside the model each goes wrong; the clean control is
the same step replayed without its fault (`--no-fault`)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollout_lab.localize import report
from rollout_lab.loop import run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SMALL = ("loop.steps=1", "loop.check_weight_sync=false", "logger.mode=disabled", "workload.num_prompts=4",
         "workload.max_tokens=16")


def fault_run(run_dir: Path, compose, *overrides: str) -> Path:
    cfg = compose(*overrides, *SMALL)
    cfg.run_dir = str(run_dir)
    result = run(cfg)
    assert result.status == "ok", result.crash
    return run_dir


def localize(run_dir: Path, *args: str) -> tuple[report.Localization, str]:
    out = run_dir / ("localize_clean" if "--no-fault" in args else "localize")
    done = subprocess.run([sys.executable, "-m", "rollout_lab.localize", str(run_dir), "--tokens", "2", "--out", str(out), *args],
                          cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / report.REPORT_NAME).is_file() and list(out.glob("*.png"))
    return report.read(out / report.RESULT_NAME), done.stdout


@pytest.fixture(scope="module")
def overflow_run(tmp_path_factory, ray_session, compose):
    return fault_run(tmp_path_factory.mktemp("overflow"), compose, "+pressure=many_slots", "fault=index_overflow")


def test_index_overflow_diverges_first_at_attention_on_high_block_requests(overflow_run):
    result, stdout = localize(overflow_run)
    flagged = [t for t in result.tokens if t.flagged]
    assert flagged, result.tokens
    threshold = 16  # conf/fault/index_overflow.yaml: blocks >= 16 are read from the wrong block
    for token in flagged:
        assert result.points[token.first].kind == "attention", token
        assert max(token.facts.kv_blocks) >= threshold, token.facts
    assert "first divergence: layer" in stdout and "attention output" in stdout


def test_the_clean_control_shows_no_point_above_the_clean_level(overflow_run):
    result, stdout = localize(overflow_run, "--no-fault")
    assert result.fault is None and result.tokens
    assert all(t.first is None for t in result.tokens), [(t.request, t.position, t.first) for t in result.tokens]
    assert "no divergence above the clean level" in stdout


def test_logit_noise_leaves_every_hidden_state_clean(tmp_path, ray_session, compose):
    result, _ = localize(fault_run(tmp_path, compose, "fault=logit_noise"))
    assert result.tokens and all(t.flagged for t in result.tokens)
    logits = [p.kind for p in result.points].index("logits")
    for token in result.tokens:
        assert token.first == logits, (token.first, result.points[token.first])
        above = [p.label() for p, d, level in zip(result.points, token.divergences, result.clean_levels) if d > level]
        assert above == ["logits"]

