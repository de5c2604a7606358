"""The hunt report on a hand-made store: ranked findings, coverage, rejected configurations kept
apart from bugs, the CSV, the plots and the offline W&B run; an empty hunt."""
import csv
import time

import pytest

from rollout_lab.hunt import report
from rollout_lab.hunt.search import Coverage
from rollout_lab.hunt.space import HuntRunConfig
from rollout_lab.hunt.protocol import Finding, Signature, TrialResult
from rollout_lab.hunt.store import Store, TrialRow
from rollout_lab.wandb_log import read_offline_run

DIMS = {"model": ["smollm2", "mamba2-tiny"], "engine.dtype": ["float32", "bfloat16"], "generator": ["chat", "long", "shared"]}
ENGINE = {"model": "smollm2", "engine.dtype": "float32"}
REJECTED_ENGINE = {"model": "mamba2-tiny", "engine.dtype": "bfloat16"}
WORKLOAD = {"generator": "chat", "seed": 1}
TIMELINE = [(10.0, 2, 0, 0.4, 0.1), (25.5, 4, 1, 0.6, 0.3), (40.0, 5, 2, 0.7, 0.4)]


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = HuntRunConfig()
    cfg.logger.mode = "offline"
    cfg.hunt.budget_s = 600.0
    cfg.fault.name = "stale_state"
    return cfg


def hunt(tmp_path):
    """Three groups (one rejected, one hung), five trials, two findings."""
    hunt_dir = tmp_path / "hunt"
    hunt_dir.mkdir()
    store = Store(hunt_dir / "hunt.db")
    store.add_group(0, "g0", ENGINE, "explore", 0.0)
    store.end_group(0, "ok")
    store.add_group(1, "g1", REJECTED_ENGINE, "explore", 1.0)
    store.end_group(1, "rejected", "ValueError: bfloat16 is not supported by mamba2-tiny")
    store.add_group(2, "g2", ENGINE | {"engine.dtype": "bfloat16"}, "explore", 2.0)
    store.end_group(2, "hang", "no progress for 180 s (trial)")
    for i, status in enumerate(["ok", "fail", "crash", "fail", "hang"]):
        store.add_trial(TrialRow(f"t{i}", 0 if i < 4 else 2, ENGINE, WORKLOAD | {"seed": i}, status, None, TrialResult(status),
                                 1.0, 10.0 * i))
    # Hit by more trials, but not minimized: ranks below the verified one.
    store.put_finding(Finding(Signature.parse("mismatch/metamorphic:smollm2:float32:preempted"), "t1", 10.0, 2, 3,
                              ENGINE, WORKLOAD, TrialResult("fail"), state="not_minimized"))
    store.put_finding(Finding(Signature.parse("ValueError@vllm/sampler.py"), "t2", 20.0, 3, 1, ENGINE, WORKLOAD,
                              TrialResult("crash"), trigger=["prefix_caching", "chunked_prefill"], repro="repro/f01/repro.py",
                              repro_rate="5/5", state="verified"))
    store.set_meta("elapsed_s", 41.0)
    coverage = Coverage(DIMS)
    coverage.record(ENGINE | {"generator": "chat", "seed": 1})
    coverage.record(ENGINE | {"generator": "long", "seed": 2})
    return hunt_dir, store, coverage


def section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_report_ranks_verified_findings_first_and_keeps_rejected_configs_apart(tmp_path, cfg):
    hunt_dir, store, coverage = hunt(tmp_path)
    path = report.write(hunt_dir, store, coverage, TIMELINE, cfg)
    assert path == hunt_dir / "HUNT_REPORT.md"
    text = path.read_text()

    assert "budget: 600 s; time spent: 41 s" in text and "fault planted: stale_state" in text
    assert "3 engine groups, 5 trials: ok 1, fail 2, crash 1, hang 1" in text

    findings = section(text, "Findings")
    table = [line for line in findings.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert [row.split(" | ")[1] for row in table] == ["ValueError@vllm/sampler.py", "mismatch/metamorphic:smollm2:float32:preempted"]
    assert table[0] == ("| 1 | ValueError@vllm/sampler.py | crash | t2 | 3 | 20.0 | 1 | prefix_caching, chunked_prefill | "
                        "repro/f01/repro.py | 5/5 | verified |")
    assert table[1] == ("| 2 | mismatch/metamorphic:smollm2:float32:preempted | mismatch/metamorphic | t1 | 2 | 10.0 | 3 | - | "
                        "- | - | not_minimized |")
    assert "mamba2-tiny" not in findings

    # 3 of 7 values (smollm2, float32, chat, long: 4); pairs: 2+2+1 of 4+6+6 = 16.
    (values, pairs), (total_values, total_pairs) = coverage.covered(), coverage.totals()
    assert (values, pairs, total_values, total_pairs) == (4, 5, 7, 16)
    covered = section(text, "Coverage")
    assert "values tried: 4/7 (57%)" in covered and "pairs of values tried: 5/16 (31%)" in covered
    assert '- `model`: "mamba2-tiny"' in covered and '- `generator`: "shared"' in covered
    assert '- `engine.dtype`: "bfloat16"' in covered
    # engine.dtype x model: 1 of 4 value pairs tried, the least covered dimension pair.
    assert covered.split("least covered:", 1)[1].strip().splitlines()[0] == "- `engine.dtype` x `model`: 1/4 (25%)"

    rejected = section(text, "Rejected configurations")
    assert 'group 1: model="mamba2-tiny" dtype="bfloat16": ValueError: bfloat16 is not supported by mamba2-tiny' in rejected
    assert "group 2" not in rejected
    assert "group 2 (hang)" in section(text, "Groups that hung")
    assert "![findings_over_time](findings_over_time.png)" in text

    with (hunt_dir / "findings.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and list(rows[0]) == report.FINDINGS_HEADER
    assert rows[0]["signature"] == "ValueError@vllm/sampler.py" and rows[0]["repro rate"] == "5/5"
    assert rows[1]["trials hit"] == "3" and rows[1]["trigger"] == "-"
    for name in ("findings_over_time.png", "coverage_over_time.png"):
        assert (hunt_dir / name).stat().st_size > 0


def test_report_goes_to_an_offline_wandb_run_that_reads_back(tmp_path, cfg):
    hunt_dir, store, coverage = hunt(tmp_path)
    text = report.write(hunt_dir, store, coverage, TIMELINE, cfg).read_text()
    runs = list((hunt_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and f"W&B (offline): `wandb/{runs[0].name}`" in text
    # W&B's service can still be writing the offline file when finish() returns.
    for _ in range(50):
        logged = read_offline_run(runs[0])
        if logged["summary"]:
            break
        time.sleep(0.2)
    assert logged["summary"]["findings"] == 2 and logged["summary"]["trials"] == 5
    assert logged["summary"]["value_coverage"] == pytest.approx(4 / 7)
    assert [row["hunt/trials"] for row in logged["history"] if "hunt/trials" in row] == [2, 4, 5]
    last = logged["history"][-1]
    assert last["hunt/findings_table/_type"] == "table-file" and last["hunt/findings_table/nrows"] == 2
    assert last["hunt/plots/coverage_over_time/_type"] == "image-file"


def test_a_wandb_failure_keeps_the_report(tmp_path, cfg, monkeypatch, capsys):
    hunt_dir, store, coverage = hunt(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("no network\nsecond line")

    monkeypatch.setattr(report, "log_wandb", broken)
    text = report.write(hunt_dir, store, coverage, TIMELINE, cfg).read_text()
    assert "W&B: not logged (RuntimeError: no network)" in text and "| 1 | ValueError@vllm/sampler.py |" in text
    assert capsys.readouterr().err.strip() == "rollout_lab.hunt: W&B logging failed, report kept: RuntimeError: no network"


def test_an_empty_hunt_says_no_findings(tmp_path, cfg):
    cfg.logger.mode = "disabled"
    store = Store(tmp_path / "hunt.db")
    text = report.write(tmp_path, store, Coverage(DIMS), [], cfg).read_text()
    assert "No findings." in section(text, "Findings")
    assert "0 engine groups, 0 trials: ok 0, fail 0, crash 0, hang 0" in text
    assert "values tried: 0/7 (0%)" in text
    assert "- none" in section(text, "Rejected configurations")
    with (tmp_path / "findings.csv").open() as f:
        assert list(csv.reader(f)) == [report.FINDINGS_HEADER]
    for name in ("findings_over_time.png", "coverage_over_time.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not (tmp_path / "wandb").exists()
