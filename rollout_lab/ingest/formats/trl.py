"""TRL: the completions_*.parquet tables GRPOTrainer logs (log_completions), text, rewards, advantage.

Columns: `step`, `prompt` (text, or a list of chat messages, rendered with the tokenizer's chat
template), `completion`, `reward` (or one column per reward function, summed), `advantage`. As
for verl, the ids come from tokenizing the text and both logprob sides are computed.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator

from rollout_lab.ingest.formats.base import ExportFormat, glob_files, require
from rollout_lab.ingest.formats.verl import encode
from rollout_lab.ingest.sequence import ExportError, ExportedSequence

TEXT_COLUMNS = ("step", "prompt", "completion", "advantage")


def _text(tokenizer, value, add_generation_prompt: bool) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # conversational: a list of {"role", "content"} messages
        return tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=add_generation_prompt)
    raise ExportError(f"a prompt or completion of type {type(value).__name__}: expected text or chat messages")


def sequence(row: dict, number: int, tokenizer, where: str) -> ExportedSequence:
    require(row, ("step", "prompt", "completion"), where)
    rewards = [v for k, v in row.items() if k not in TEXT_COLUMNS and isinstance(v, (int, float)) and v is not None]
    completion = row["completion"]
    if isinstance(completion, list):
        completion = "".join(m.get("content", "") for m in completion)
    return ExportedSequence(
        step=int(row["step"]),
        prompt_token_ids=encode(tokenizer, _text(tokenizer, row["prompt"], True)),
        token_ids=encode(tokenizer, completion),
        reward=float(row["reward"]) if row.get("reward") is not None else (float(sum(rewards)) if rewards else None),
        request_id=str(number),
    ).check(where)


def _sequences(file: BinaryIO, path: Path, tokenizer) -> Iterator[ExportedSequence]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    number = 0
    for group in range(parquet.num_row_groups):
        for row in parquet.read_row_group(group).to_pylist():
            yield sequence(row, number, tokenizer, f"{path} row {number}")
            number += 1


FORMAT = ExportFormat(
    name="trl",
    reads="completions_*.parquet (GRPOTrainer log_completions): step, prompt, completion (text), reward(s), advantage; "
          "tokenized with --model's tokenizer, both logprob sides computed (the sampler's by replay: --engine-config)",
    files=lambda path: glob_files(path, "**/completions_*.parquet", "TRL completions_*.parquet tables"),
    sequences=_sequences,
    has_sampler_logprobs=False,
)
