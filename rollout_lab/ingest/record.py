"""<run_dir>/ingest.json: where an ingested run came from and which side of each token is whose.

Reader and writer live here (IngestRecord.write / IngestRecord.read); the diagnoses and the noise
floor are written beside it by diagnose.py and rollout_lab/noise_floor.py.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from rollout_lab.records import RecordsError

INGEST_FILE = "ingest.json"
INGEST_VERSION = 1
# Who gave each logprob side.
FROM_EXPORT = "export"
COMPUTED_TRAINER = "computed: transformers teacher forcing with --model (rollout_lab.reference.reference_logprobs)"
REPLAYED_SAMPLER = "replayed: vLLM prefill scoring (prompt_logprobs) of the exported tokens, engine from --engine-config"


@dataclass
class IngestRecord:
    """One ingest: the export read, the model used, who gave each logprob side, what the export lacked."""

    format: str
    source: str
    model: str
    # FROM_EXPORT (with the export's field name), COMPUTED_TRAINER or REPLAYED_SAMPLER.
    sampler_side: str
    trainer_side: str
    engine_config: Optional[str] = None
    files: int = 0
    sequences: int = 0
    tokens: int = 0
    steps: list[int] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    # Facts the run dir's schema holds that this export does not: column -> what stands in for it.
    missing: dict[str, str] = field(default_factory=dict)
    version: int = INGEST_VERSION

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / INGEST_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, run_dir: Path) -> Optional["IngestRecord"]:
        """The run dir's ingest record; None for a run the lab made itself; RecordsError for a bad file."""
        path = Path(run_dir) / INGEST_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("version") != INGEST_VERSION:
                raise RecordsError(f"{path} has version {data.get('version')!r}, expected {INGEST_VERSION}")
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise RecordsError(f"{path}: unknown key(s) {', '.join(unknown)}")
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise RecordsError(f"{path} is corrupted ({exc})".splitlines()[0]) from None
