"""`python -m rollout_lab.ingest <format> <path> --model <checkpoint>`: a training framework's export
as a rollout_lab run dir, then the lab's verdicts on it: the console summary, the pipeline
diagnoses with their evidence, the trainer's own noise floor and what remains for the engine
(INGEST_REPORT.md). Formats: rollout_lab/ingest/formats/ (docs/your_run.md)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from rollout_lab.ingest.formats import FORMATS

    parser = argparse.ArgumentParser(prog="python -m rollout_lab.ingest", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="formats:\n" + "\n".join(f"  {f.name}: {f.reads}" for f in FORMATS.values()))
    parser.add_argument("format", choices=list(FORMATS), help="the framework that wrote the export")
    parser.add_argument("path", type=Path, help="the export: a file, or the framework's log/export dir")
    parser.add_argument("--model", required=True, help="the checkpoint the run trained: a directory, a hub id or an embedded model")
    parser.add_argument("--out", type=Path, help="the run dir to write (default runs/<date>/<time>-ingest-<format>)")
    parser.add_argument("--engine-config", type=Path,
                        help="YAML of the engine you ran (engine: {dtype, ..., args: {vLLM EngineArgs}}, workload: {temperature, "
                             "top_p, top_k}): checked like engine.args; needed to replay a side the export lacks, and by the minimizer")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the dtype your run computed logprobs in: picks the spike threshold (rollout_lab/tolerances.py)")
    parser.add_argument("--spike-threshold", type=float, help="flag tokens with |sampler - trainer| above this instead")
    parser.add_argument("--noise-floor-sequences", type=int, default=32,
                        help="sequences the trainer scores against itself for its noise floor (0: skip)")
    parser.add_argument("--split-by", action="append", default=[],
                        help="a column (step, worker, weight_version, ...) to test structure vs magnitude across (repeatable)")
    parser.add_argument("--wandb", choices=("offline", "online", "disabled"), default="offline", help="W&B mode (default offline)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rollout_lab.__main__ import print_summary
    from rollout_lab.config import ConfigError
    from rollout_lab.ingest.diagnose import diagnose, print_diagnoses
    from rollout_lab.ingest.sequence import ExportError
    from rollout_lab.ingest.writer import ingest
    from rollout_lab.models import ModelError
    from rollout_lab.records import RecordsError

    try:
        result, record = ingest(args.format, args.path, args.model, args.out, args.engine_config, args.dtype,
                                args.spike_threshold, logger_mode=args.wandb)
        floor = None
        if args.noise_floor_sequences > 0:
            from rollout_lab.noise_floor import measure

            floor = measure(Path(result.run_dir), args.noise_floor_sequences)
        report = diagnose(Path(result.run_dir), floor)
        split_reports = []
        if args.split_by:
            from rollout_lab.ingest.columns import split_report

            split_reports = [split_report(Path(result.run_dir), column) for column in args.split_by]
    except (ExportError, ConfigError, ModelError, RecordsError) as exc:
        print(f"rollout_lab.ingest: {exc}", file=sys.stderr)
        return 2
    print(f"ingested {record.sequences} sequences, {record.tokens} tokens, {len(record.steps)} steps from {record.files} "
          f"file(s) ({record.bytes_read / 1e6:.1f} MB) in {record.seconds:.0f} s")
    print(f"sampler side: {record.sampler_side}\ntrainer side: {record.trainer_side}")
    print_summary(result)
    from rollout_lab.noise_floor import above_floor

    print(above_floor(result.abs_diff_max, floor))
    print_diagnoses(report)
    for path in split_reports:
        print(f"structure vs magnitude: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
