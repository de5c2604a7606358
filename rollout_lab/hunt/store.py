"""The hunt's findings store: one SQLite file (hunt.db) in the hunt dir, written as results arrive.

Tables: groups (one engine configuration each), trials (one workload on it: its config, every
oracle's verdict, time), findings (one per distinct signature), meta (the hunt clock). Every write
is its own transaction, so a SIGKILL loses at most the trial in flight, and a resumed hunt reads
back everything it needs: which trials ran (none is repeated), the coverage, the findings.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS groups (
    idx INTEGER PRIMARY KEY, key TEXT, engine TEXT, reason TEXT, status TEXT, message TEXT,
    engine_seconds REAL, started REAL);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY, group_idx INTEGER, engine TEXT, workload TEXT, status TEXT,
    signature TEXT, oracles TEXT, result TEXT, seconds REAL, elapsed REAL);
CREATE TABLE IF NOT EXISTS findings (
    signature TEXT PRIMARY KEY, kind TEXT, first_trial TEXT, first_elapsed REAL, first_trial_number INTEGER,
    trials INTEGER, model TEXT, dtype TEXT, trigger TEXT, repro TEXT, repro_rate TEXT, state TEXT, detail TEXT);
"""


class StoreError(RuntimeError):
    """A hunt dir whose store cannot be read; the message names the file."""


@dataclass
class Finding:
    signature: str
    kind: str  # crash / hang / mismatch
    first_trial: str
    first_elapsed: float
    first_trial_number: int
    trials: int
    model: str
    dtype: str
    trigger: Optional[list] = None  # the knobs that switch it on (from the minimizer)
    repro: Optional[str] = None
    repro_rate: Optional[str] = None  # "k/n" standalone runs that reproduced
    # new / minimized / verified / flaky / not_minimized / no_repro / known / duplicate (of the
    # minimized finding in detail["duplicate_of"], whose trigger holds in its engine)
    state: str = "new"
    detail: Optional[dict] = None


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
        elif int(version) != SCHEMA_VERSION:
            raise StoreError(f"{path} has schema version {version}; this rollout_lab reads {SCHEMA_VERSION}")

    def meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # groups
    def add_group(self, idx: int, key: str, engine: dict, reason: str, started: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO groups VALUES (?,?,?,?,?,?,?,?)",
                        (idx, key, json.dumps(engine), reason, "running", None, None, started))

    def end_group(self, idx: int, status: str, message: str = "", engine_seconds: Optional[float] = None) -> None:
        self.db.execute("UPDATE groups SET status=?, message=?, engine_seconds=COALESCE(?, engine_seconds) WHERE idx=?",
                        (status, message, engine_seconds, idx))

    def groups(self) -> list[dict]:
        rows = self.db.execute("SELECT idx, key, engine, reason, status, message, engine_seconds, started FROM groups ORDER BY idx")
        return [dict(idx=r[0], key=r[1], engine=json.loads(r[2]), reason=r[3], status=r[4], message=r[5],
                     engine_seconds=r[6], started=r[7]) for r in rows]

    def next_group_index(self) -> int:
        row = self.db.execute("SELECT MAX(idx) FROM groups").fetchone()
        return 0 if row[0] is None else row[0] + 1

    # trials
    def add_trial(self, key: str, group_idx: int, engine: dict, workload: dict, status: str, signature: Optional[str],
                  result: dict, seconds: float, elapsed: float) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO trials VALUES (?,?,?,?,?,?,?,?,?,?)",
            (key, group_idx, json.dumps(engine), json.dumps(workload), status, signature,
             json.dumps(result.get("oracles", {})), json.dumps(result, default=str), seconds, elapsed),
        )

    def trial_keys(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT key FROM trials")}

    def trials(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT key, group_idx, engine, workload, status, signature, result, seconds, elapsed FROM trials ORDER BY rowid")
        return [dict(key=r[0], group_idx=r[1], engine=json.loads(r[2]), workload=json.loads(r[3]), status=r[4],
                     signature=r[5], result=json.loads(r[6]), seconds=r[7], elapsed=r[8]) for r in rows]

    def count_trials(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM trials").fetchone()[0]

    # findings
    def finding(self, signature: str) -> Optional[Finding]:
        row = self.db.execute("SELECT * FROM findings WHERE signature=?", (signature,)).fetchone()
        return self._finding(row) if row else None

    def findings(self) -> list[Finding]:
        return [self._finding(r) for r in self.db.execute("SELECT * FROM findings ORDER BY first_elapsed")]

    def put_finding(self, f: Finding) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO findings VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (f.signature, f.kind, f.first_trial, f.first_elapsed, f.first_trial_number, f.trials, f.model, f.dtype,
             json.dumps(f.trigger), f.repro, f.repro_rate, f.state, json.dumps(f.detail, default=str)),
        )

    @staticmethod
    def _finding(row) -> Finding:
        return Finding(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], json.loads(row[8]) if row[8] else None,
                       row[9], row[10], row[11], json.loads(row[12]) if row[12] else None)
