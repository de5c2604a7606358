"""The interface every export format implements, and the helpers its readers share."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

from rollout_lab.ingest.sequence import ExportError, ExportedSequence


@dataclass(frozen=True)
class ExportFormat:
    """How one framework's export is found and read."""

    name: str
    # One sentence for --help and the docs: which files, which fields.
    reads: str
    # The export files under a path the user gives (a file or the framework's log dir), in step order.
    files: Callable[[Path], list[Path]]
    # The sequences of one file, streamed; the tokenizer is for formats that keep text, not ids.
    sequences: Callable[[BinaryIO, Path, object], Iterator[ExportedSequence]]
    # Whether the export carries the sampler's logprobs (else they need an engine replay).
    has_sampler_logprobs: bool = True


def glob_files(path: Path, pattern: str, what: str, step_of: Optional[Callable[[Path], int]] = None) -> list[Path]:
    """`path` itself if a file, else the files matching `pattern` under it (by step_of, else by name);
    ExportError when there are none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ExportError(f"{path} does not exist")
    found = sorted(path.glob(pattern), key=step_of or str)
    if not found:
        raise ExportError(f"{path} holds no {what} (looked for {pattern})")
    return found


def number_in(path: Path, pattern: str) -> int:
    """The integer `pattern`'s group captures in the path ('train_data_step(\\d+)'); ExportError if none."""
    match = re.search(pattern, str(path))
    if match is None:
        raise ExportError(f"{path}: cannot read the step from its name (expected {pattern})")
    return int(match.group(1))


def require(row: dict, names: tuple[str, ...], where: str) -> None:
    """ExportError naming the fields of `names` that `row` lacks."""
    missing = [n for n in names if n not in row]
    if missing:
        raise ExportError(f"{where}: missing field(s) {', '.join(missing)} (has {', '.join(sorted(row)) or 'none'})")
