"""The generic schema: JSONL or Parquet files of rollout_lab.ingest.sequence's fields, one completion each."""
from pathlib import Path

from rollout_lab.ingest.formats.base import ExportFormat, glob_files
from rollout_lab.ingest.sequence import read_generic


def _files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted([*path.glob("*.jsonl"), *path.glob("*.parquet")]) if path.is_dir() else []
    return files or glob_files(path, "*.jsonl", "generic-schema files (*.jsonl, *.parquet)")


FORMAT = ExportFormat(
    name="generic",
    reads="*.jsonl / *.parquet in rollout_lab's generic schema (docs/your_run.md#generic): step, prompt_token_ids, "
          "token_ids, sampler_logprobs, trainer_logprobs, reward, weight_version, sampling params, ...",
    files=_files,
    sequences=lambda file, path, tokenizer: read_generic(file, path),
)
