"""The hunt's findings store: one SQLite file (hunt.db) in the hunt dir, written as results arrive.

Tables: groups (one engine configuration each), trials (one workload on it: its config, every
oracle's verdict, time), findings (one per distinct signature, a protocol.Finding), meta (the
hunt clock). Every write is its own transaction, so a SIGKILL loses at most the trial in flight,
and a resumed hunt reads back everything it needs: which trials ran (none is repeated), the
coverage, the findings. No path in it is absolute: a hunt dir copied to another machine resumes.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rollout_lab.hunt.protocol import Finding, Signature, TrialResult

# 2: typed records (protocol.py): a trial's result and a finding are one JSON record each, a
# group keeps its workloads. A schema-1 store is rewritten as 2 when opened (migrate.py).
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS groups (
    idx INTEGER PRIMARY KEY, key TEXT, engine TEXT, reason TEXT, status TEXT, message TEXT,
    engine_seconds REAL, started REAL, workloads TEXT);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY, group_idx INTEGER, engine TEXT, workload TEXT, status TEXT,
    signature TEXT, result TEXT, seconds REAL, elapsed REAL);
CREATE TABLE IF NOT EXISTS findings (
    signature TEXT PRIMARY KEY, kind TEXT, state TEXT, first_elapsed REAL, record TEXT);
"""


class StoreError(RuntimeError):
    """A hunt dir whose store cannot be read; the message names the file."""


@dataclass
class GroupRow:
    idx: int
    key: str
    engine: dict
    reason: str
    # running / ok / rejected / crash / hang / died / skipped / killed / out_of_time
    status: str
    message: Optional[str]
    engine_seconds: Optional[float]
    started: float
    workloads: list[dict]  # the workload points it was planned with


@dataclass
class TrialRow:
    key: str
    group_idx: int
    engine: dict
    workload: dict
    status: str
    signature: Optional[Signature]
    result: TrialResult
    seconds: float
    elapsed: float  # hunt seconds when it was recorded


class Store:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
            self.db.executescript(SCHEMA)
            version = self.meta("schema_version")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path} is not a readable hunt store: {exc}") from None
        if version is None:
            self.set_meta("schema_version", SCHEMA_VERSION)
        elif int(version) == 1:
            from rollout_lab.hunt.migrate import migrate_v1

            migrate_v1(self.db, path.parent)
        elif int(version) != SCHEMA_VERSION:
            raise StoreError(f"{path} has schema version {version}; this rollout_lab reads {SCHEMA_VERSION} "
                             f"(finish that hunt with the rollout_lab that started it, or pick a new dir)")

    def meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # groups
    def add_group(self, idx: int, key: str, engine: dict, reason: str, started: float, workloads: list[dict] = ()) -> None:
        self.db.execute("INSERT OR REPLACE INTO groups VALUES (?,?,?,?,?,?,?,?,?)",
                        (idx, key, json.dumps(engine), reason, "running", None, None, started, json.dumps(list(workloads))))

    def end_group(self, idx: int, status: str, message: str = "", engine_seconds: Optional[float] = None) -> None:
        self.db.execute("UPDATE groups SET status=?, message=?, engine_seconds=COALESCE(?, engine_seconds) WHERE idx=?",
                        (status, message, engine_seconds, idx))

    def groups(self) -> list[GroupRow]:
        rows = self.db.execute(
            "SELECT idx, key, engine, reason, status, message, engine_seconds, started, workloads FROM groups ORDER BY idx")
        return [GroupRow(r[0], r[1], json.loads(r[2]), *r[3:8], json.loads(r[8])) for r in rows]

    def next_group_index(self) -> int:
        row = self.db.execute("SELECT MAX(idx) FROM groups").fetchone()
        return 0 if row[0] is None else row[0] + 1

    # trials
    def add_trial(self, row: TrialRow) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO trials VALUES (?,?,?,?,?,?,?,?,?)",
            (row.key, row.group_idx, json.dumps(row.engine), json.dumps(row.workload), row.status,
             None if row.signature is None else str(row.signature), json.dumps(row.result.to_json(), default=str),
             row.seconds, row.elapsed),
        )

    def trial_keys(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT key FROM trials")}

    def trials(self) -> list[TrialRow]:
        rows = self.db.execute(
            "SELECT key, group_idx, engine, workload, status, signature, result, seconds, elapsed FROM trials ORDER BY rowid")
        return [TrialRow(r[0], r[1], json.loads(r[2]), json.loads(r[3]), r[4], Signature.parse(r[5]) if r[5] else None,
                         TrialResult.from_json(json.loads(r[6])), r[7], r[8]) for r in rows]

    def count_trials(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM trials").fetchone()[0]

    # findings
    def finding(self, signature: Signature) -> Optional[Finding]:
        row = self.db.execute("SELECT record FROM findings WHERE signature=?", (str(signature),)).fetchone()
        return Finding.from_json(json.loads(row[0])) if row else None

    def findings(self) -> list[Finding]:
        return [Finding.from_json(json.loads(r[0])) for r in self.db.execute("SELECT record FROM findings ORDER BY first_elapsed")]

    def put_finding(self, f: Finding) -> None:
        self.db.execute("INSERT OR REPLACE INTO findings VALUES (?,?,?,?,?)",
                        (str(f.signature), f.kind, f.state, f.first_elapsed, json.dumps(f.to_json(), default=str)))
