"""Bring your own run: a training framework's export in, a rollout_lab run dir out.

    export files -> formats/<name>.py (ExportFormat.sequences) -> ExportedSequence
                 -> writer.py (trainer side by teacher forcing where missing) -> run dir:
                    records/, requests/, summary.json, config.json, metrics.jsonl, W&B, ingest.json
    run dir      -> diagnose.py (pipeline diagnoses, named, with evidence) -> INGEST_REPORT.md
                 -> noise_floor.py (the trainer against itself) -> noise_floor.json
                 -> columns.py (structure vs magnitude across a column) -> by_<column>/SWEEP_REPORT.md

`python -m rollout_lab.ingest <format> <path> --model <checkpoint>` runs it all (docs/your_run.md).
"""
