"""Hunt dirs written before the typed records (store schema 1): their hunt.db and lines files,
rewritten once in place as protocol records, so a hunt started by an older rollout_lab resumes."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Optional

from rollout_lab.crash import CrashSignature
from rollout_lab.hunt.protocol import (EngineStarted, EngineStarting, Finding, Heartbeat, OracleVerdict, Signature,
                                       TrialEvent, TrialFinished, TrialResult, TrialStarted, WorstToken, event_line)
from rollout_lab.hunt.space import engine_args
from rollout_lab.minimize.handoff import MinimizedResult
from rollout_lab.minimize.standalone import Case, Request

V1_DIED = "ProcessDied@"


def result_from_v1(data: dict, engine: dict) -> TrialResult:
    """A schema-1 result dict (a result line's fields) as a TrialResult."""
    status, crash = data.get("status", "crash"), data.get("crash") or None
    if crash and crash.get("key", "").startswith(V1_DIED):
        return TrialResult("died", float(data.get("seconds", 0.0)), phase=data.get("phase", "trial"), message=crash.get("message", ""))
    oracles = {name: OracleVerdict(v.get("tokens", 0), v.get("flagged", 0), float(v.get("max", 0.0)), v.get("class"),
                                   WorstToken(**v["worst"]) if v.get("worst") else None, v.get("requests", 0),
                                   v.get("identical", 0), bool(v.get("promised", False)), v.get("first_token_diff"))
               for name, v in (data.get("oracles") or {}).items()}
    fields = data.get("case") or data.get("case_for_crash")
    case = None if not fields else Case(
        str(engine.get("model")), engine_args(engine) | {"disable_log_stats": False}, [Request(**r) for r in fields["requests"]],
        fields["max_tokens"], fields.get("temperature", 1.0), fields.get("top_p", 1.0), fields.get("top_k", -1))
    return TrialResult(status, float(data.get("seconds", 0.0)), data.get("dtype"), oracles, data.get("num_requests", 0),
                       data.get("num_aborted", 0), data.get("num_tokens", 0), data.get("preempted_requests", 0),
                       data.get("cached_requests", 0), data.get("batch", True), data.get("phase_seconds") or {}, case,
                       CrashSignature.from_dict(crash) if crash else None, data.get("phase", "trial"), data.get("message", ""))


def signature_from_v1(text: Optional[str], engine: dict) -> Optional[Signature]:
    if not text:
        return None
    if text.startswith(V1_DIED):
        return Signature("died", phase=text.removeprefix(V1_DIED), model=str(engine.get("model")))
    return Signature.parse(text)


def event_from_v1(data: dict, engine: dict) -> Optional[TrialEvent]:
    """A schema-1 line as an event (None for one no reader needs)."""
    kind, group = data.get("event"), data.get("group", "")
    if kind == "engine_start":
        return EngineStarting(group, data.get("args", {}))
    if kind == "engine":
        crash = data.get("crash")
        return EngineStarted(group, data["status"], float(data.get("seconds", 0.0)), data.get("dtype"), data.get("blocks"),
                             CrashSignature.from_dict(crash) if crash else None, data.get("message") or "")
    if kind == "start":
        return TrialStarted(group, data["trial"])
    if kind == "beat":
        return Heartbeat(group, int(data["steps"]))
    if kind == "result":
        return TrialFinished(group, data["trial"], data.get("point", {}), result_from_v1(data, engine))
    return None


def relative_repro(repro: Optional[str], hunt_dir: Path) -> Optional[str]:
    """Schema 1 kept absolute repro paths; one in the hunt dir becomes relative to it."""
    if not repro:
        return repro
    try:
        return str(Path(repro).resolve().relative_to(hunt_dir.resolve()))
    except ValueError:
        return repro


def migrate_v1(db: sqlite3.Connection, hunt_dir: Path) -> None:
    """Rewrite a schema-1 store (one transaction), then the lines files of its groups."""
    lines = {}
    for idx, engine in db.execute("SELECT idx, engine FROM groups").fetchall():
        path = hunt_dir / "lines" / f"group_{idx:04d}.jsonl"
        if path.is_file():
            events = [event_from_v1(data, json.loads(engine)) for data in _v1_lines(path)]
            lines[path] = "".join(event_line(e) for e in events if e is not None)
    db.execute("BEGIN")
    try:
        _migrate_tables(db, hunt_dir)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    for path, text in lines.items():
        path.with_suffix(".tmp").write_text(text)
        path.with_suffix(".tmp").replace(path)


def _v1_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a schema-1 lines file (a killed writer may have cut the last one)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _migrate_tables(db: sqlite3.Connection, hunt_dir: Path) -> None:
    db.execute("ALTER TABLE groups ADD COLUMN workloads TEXT DEFAULT '[]'")
    trials = db.execute("SELECT key, group_idx, engine, workload, signature, result, seconds, elapsed FROM trials").fetchall()
    db.execute("DROP TABLE trials")
    db.execute("CREATE TABLE trials (key TEXT PRIMARY KEY, group_idx INTEGER, engine TEXT, workload TEXT, status TEXT, "
               "signature TEXT, result TEXT, seconds REAL, elapsed REAL)")
    for key, group_idx, engine, workload, signature, result, seconds, elapsed in trials:
        point = json.loads(engine)
        sig = signature_from_v1(signature, point)
        converted = result_from_v1(json.loads(result), point)
        db.execute("INSERT INTO trials VALUES (?,?,?,?,?,?,?,?,?)",
                   (key, group_idx, engine, workload, converted.status, None if sig is None else str(sig),
                    json.dumps(converted.to_json(), default=str), seconds, elapsed))
    findings = db.execute("SELECT first_trial, first_elapsed, first_trial_number, trials, trigger, repro, repro_rate, "
                          "state, detail, signature FROM findings").fetchall()
    db.execute("DROP TABLE findings")
    db.execute("CREATE TABLE findings (signature TEXT PRIMARY KEY, kind TEXT, state TEXT, first_elapsed REAL, record TEXT)")
    for first_trial, first_elapsed, number, hits, trigger, repro, rate, state, detail, signature in findings:
        detail = json.loads(detail) if detail else {}
        engine = detail.get("engine", {})
        minimized = detail.get("minimized")
        finding = Finding(signature_from_v1(signature, engine), first_trial, first_elapsed, number, hits, engine,
                          detail.get("workload", {}), result_from_v1(detail.get("result", {}), engine), state,
                          json.loads(trigger) if trigger else None, relative_repro(repro, hunt_dir), rate,
                          detail.get("why", ""), detail.get("duplicate_of"), bool(detail.get("needs_planted_fault")),
                          MinimizedResult.from_json(minimized) if minimized else None, detail.get("verify_exits") or [],
                          detail.get("no_fault_exit"))
        db.execute("INSERT INTO findings VALUES (?,?,?,?,?)", (str(finding.signature), finding.kind, finding.state,
                                                               finding.first_elapsed, json.dumps(finding.to_json(), default=str)))
    db.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
