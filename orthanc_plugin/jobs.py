"""The job store: SQLite (WAL), the source of truth for every read.

A job moves queued → running → storing → forwarding → done, or to failed (with a reason) or
retrying (with the time of the next attempt). Runners claim jobs with a lease that they renew
(heartbeat); a job whose lease ran out is claimed again by the next runner, so execution is
at-least-once and the deterministic output UIDs keep it to one set of outputs. Each destination
of a job has its own state, so one destination that is down delays only its own deliveries.

Every call opens its own short connection: the store is shared by Orthanc's REST threads and
runner processes, and SQLite's locking (busy timeout) serializes their writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "storing", "forwarding", "retrying", "done", "failed", "cancelled")
ACTIVE = ("running", "storing")  # held under a lease by a runner
FINAL = ("done", "failed", "cancelled")
DESTINATION_STATES = ("pending", "sending", "retrying", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_id TEXT NOT NULL,               -- Orthanc's study identifier
    study_instance_uid TEXT NOT NULL,
    rule TEXT NOT NULL,
    engine TEXT NOT NULL,
    request TEXT NOT NULL,                -- JSON: the rule (or explicit request) the job runs
    priority INTEGER NOT NULL DEFAULT 0,
    fingerprint TEXT NOT NULL,            -- the study's source instances when the job was made
    version INTEGER NOT NULL DEFAULT 1,   -- 1 for the first read of (study, rule), then 2, 3 ...
    state TEXT NOT NULL,
    step TEXT NOT NULL DEFAULT '',
    progress REAL NOT NULL DEFAULT 0,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    lease_owner TEXT,
    lease_expires_at REAL,
    series TEXT,                          -- JSON: the series read and why
    timings TEXT NOT NULL DEFAULT '{}',
    outputs TEXT NOT NULL DEFAULT '{}',
    destinations TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_instance_uid);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_JSON_COLUMNS = ("request", "series", "timings", "outputs", "destinations")


class JobError(ValueError):
    """A request about a job that cannot be honoured (unknown id, wrong state)."""


@dataclass
class Job:
    """One read of one study by one rule."""

    id: int
    study_id: str
    study_instance_uid: str
    rule: str
    engine: str
    request: dict[str, Any]
    priority: int
    fingerprint: str
    version: int
    state: str
    step: str
    progress: float
    error: str | None
    attempts: int
    next_attempt_at: float | None
    lease_owner: str | None
    lease_expires_at: float | None
    series: dict[str, Any] | None
    timings: dict[str, float]
    outputs: dict[str, Any]
    destinations: dict[str, dict[str, Any]]
    created_at: float
    updated_at: float
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The job as the admin API shows it."""
        return {
            "id": self.id, "state": self.state, "step": self.step, "progress": round(self.progress, 1),
            "study": self.study_id, "study_instance_uid": self.study_instance_uid, "rule": self.rule,
            "engine": self.engine, "version": self.version, "priority": self.priority, "error": self.error,
            "attempts": self.attempts, "next_attempt_at": _iso(self.next_attempt_at), "series": self.series,
            "timings": self.timings, "outputs": self.outputs, "destinations": self.destinations,
            "request": self.request, "created": _iso(self.created_at), "updated": _iso(self.updated_at),
            "finished": _iso(self.finished_at),
        }


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class JobStore:
    """Jobs in one SQLite file, shared by the plugin and any number of runners."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock at once, so read-then-write is atomic."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # --- making jobs ---------------------------------------------------------------------------

    def enqueue(self, *, study_id: str, study_instance_uid: str, rule: str, engine: str, request: dict[str, Any],
                fingerprint: str, priority: int = 0, destinations: tuple[str, ...] = (), series: dict | None = None,
                state: str = "queued", error: str | None = None) -> Job:
        """Add a job (queued, or failed from birth); its version counts the earlier reads of the
        same study by the same rule."""
        if state not in ("queued", "failed"):
            raise ValueError(f"a new job is queued or failed, not {state!r}")
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT MAX(version) FROM jobs WHERE study_id = ? AND rule = ?", (study_id, rule)).fetchone()
            version = (row[0] or 0) + 1
            cursor = db.execute(
                "INSERT INTO jobs (study_id, study_instance_uid, rule, engine, request, priority, fingerprint, version,"
                " state, error, series, destinations, created_at, updated_at, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study_id, study_instance_uid, rule, engine, json.dumps(request), priority, fingerprint, version, state,
                 error, json.dumps(series), json.dumps({d: {"state": "pending", "attempts": 0} for d in destinations}), now, now,
                 now if state in FINAL else None))
            job_id = cursor.lastrowid
        return self.get(job_id)

    def latest(self, study_id: str, rule: str) -> Job | None:
        """The newest job of ``study_id`` under ``rule``, or None."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE study_id = ? AND rule = ? ORDER BY version DESC LIMIT 1",
                             (study_id, rule)).fetchone()
        return _job(row) if row else None

    # --- reading -------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobError(f"no job {job_id}")
        return _job(row)

    def list(self, *, state: str | None = None, study: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first; ``study`` is a StudyInstanceUID or Orthanc study id."""
        where, args = [], []
        if state:
            where.append("state = ?")
            args.append(state)
        if study:
            where.append("(study_instance_uid = ? OR study_id = ?)")
            args += [study, study]
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        with self._connect() as db:
            return [_job(r) for r in db.execute(sql, (*args, limit))]

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, zero included)."""
        with self._connect() as db:
            found = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {s: found.get(s, 0) for s in STATES}

    # --- running -------------------------------------------------------------------------------

    def claim(self, owner: str, lease_s: float) -> Job | None:
        """Take the most urgent runnable job under a lease, or None.

        Runnable: queued; retrying and due; or running/storing with a lease that ran out (its
        runner died). Higher priority first, then oldest.
        """
        now = time.time()
        runnable = ("SELECT id FROM jobs WHERE state = 'queued' OR (state = 'retrying' AND next_attempt_at <= ?)"
                    " OR (state IN ('running', 'storing') AND lease_expires_at < ?) ORDER BY priority DESC, id LIMIT 1")
        with self._connect() as db:  # a plain read first: no write lock while the queue is empty
            if db.execute(runnable, (now, now)).fetchone() is None:
                return None
        with self._write() as db:
            row = db.execute(runnable, (now, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', step = 'claimed', attempts = attempts + 1, lease_owner = ?,"
                       " lease_expires_at = ?, next_attempt_at = NULL, error = NULL, updated_at = ? WHERE id = ?",
                       (owner, now + lease_s, now, row[0]))
        return self.get(row[0])

    def heartbeat(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Renew the lease; False when the job is no longer this runner's (cancelled, taken over)."""
        now = time.time()
        with self._write() as db:
            cursor = db.execute("UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE id = ? AND lease_owner = ?"
                                " AND state IN ('running', 'storing')", (now + lease_s, now, job_id, owner))
        return cursor.rowcount == 1

    def update(self, job_id: int, owner: str | None = None, **fields: Any) -> bool:
        """Set fields of a job (JSON fields as Python values); with ``owner``, only while it holds the lease."""
        allowed = {"state", "step", "progress", "error", "series", "timings", "outputs", "destinations",
                   "next_attempt_at", "request"}
        unknown = set(fields) - allowed
        if unknown:
            raise TypeError(f"cannot update {sorted(unknown)}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown job state {fields['state']!r}")
        values = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in fields.items()}
        now = time.time()
        values["updated_at"] = now
        if "state" in fields:
            values["finished_at"] = now if fields["state"] in FINAL else None
        if fields.get("state") and fields["state"] not in ACTIVE:
            values["lease_owner"] = None
            values["lease_expires_at"] = None
        sql = "UPDATE jobs SET " + ", ".join(f"{k} = ?" for k in values) + " WHERE id = ?"
        args = [*values.values(), job_id]
        if owner is not None:
            sql += " AND lease_owner = ?"
            args.append(owner)
        with self._write() as db:
            return db.execute(sql, args).rowcount == 1

    def add_timing(self, job_id: int, name: str, seconds: float) -> None:
        with self._write() as db:
            row = db.execute("SELECT timings FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobError(f"no job {job_id}")
            timings = json.loads(row[0])
            timings[name] = round(seconds, 3)
            db.execute("UPDATE jobs SET timings = ? WHERE id = ?", (json.dumps(timings), job_id))

    def fail(self, job_id: int, reason: str, *, retry_in_s: float | None = None, owner: str | None = None) -> None:
        """Record a failure: permanent, or ``retrying`` with the next attempt ``retry_in_s`` from now."""
        if retry_in_s is None:
            self.update(job_id, owner, state="failed", error=reason)
        else:
            self.update(job_id, owner, state="retrying", error=reason, next_attempt_at=time.time() + retry_in_s)

    # --- forwarding ----------------------------------------------------------------------------

    def set_destination(self, job_id: int, name: str, **fields: Any) -> Job:
        """Update one destination's state on a job; when none is left to deliver, the job ends.

        The job is done when every destination is done, failed when any failed for good.
        """
        if "state" in fields and fields["state"] not in DESTINATION_STATES:
            raise ValueError(f"unknown destination state {fields['state']!r}")
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT destinations, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobError(f"no job {job_id}")
            destinations = json.loads(row[0])
            destinations.setdefault(name, {"state": "pending", "attempts": 0}).update(fields)
            states = {d["state"] for d in destinations.values()}
            state, error, finished = row[1], None, None
            if row[1] == "forwarding" and states <= {"done", "failed"}:
                failed = [n for n, d in destinations.items() if d["state"] == "failed"]
                state = "failed" if failed else "done"
                finished = now
                if failed:
                    error = "; ".join(f"destination {n}: {destinations[n].get('last_error', 'failed')}" for n in failed)
            db.execute("UPDATE jobs SET destinations = ?, state = ?, error = COALESCE(?, error), updated_at = ?,"
                       " finished_at = COALESCE(?, finished_at), progress = CASE WHEN ? THEN 100 ELSE progress END,"
                       " step = CASE WHEN ? THEN ? ELSE step END WHERE id = ?",
                       (json.dumps(destinations), state, error, now, finished, finished is not None,
                        finished is not None, state, job_id))
        return self.get(job_id)

    def due_deliveries(self, stale_after_s: float, limit: int = 20) -> list[tuple[Job, str]]:
        """(job, destination) pairs in forwarding whose destination is pending or due for a retry.

        A delivery still "sending" after ``stale_after_s`` lost its runner and is due again.
        """
        now = time.time()
        out = []
        for job in self.list(state="forwarding", limit=1000)[::-1]:
            for name, d in job.destinations.items():
                due = (d["state"] == "pending"
                       or (d["state"] == "retrying" and d.get("next_attempt_at", 0) <= now)
                       or (d["state"] == "sending" and d.get("sending_since", 0) + stale_after_s <= now))
                if due:
                    out.append((job, name))
        return out[:limit]

    def finish_storing(self, job_id: int, owner: str) -> Job:
        """After the outputs are stored: forward them, or end the job when it has no destinations."""
        job = self.get(job_id)
        state = "forwarding" if job.destinations else "done"
        self.update(job_id, owner, state=state, step="forwarding" if job.destinations else "done",
                    progress=95.0 if job.destinations else 100.0)
        return self.get(job_id)

    # --- admin actions -------------------------------------------------------------------------

    def cancel(self, job_id: int) -> Job:
        job = self.get(job_id)
        if job.state in FINAL:
            raise JobError(f"job {job_id} is already {job.state}")
        self.update(job_id, state="cancelled", error="cancelled by an administrator")
        return self.get(job_id)

    def retry(self, job_id: int) -> Job:
        """Run a failed or cancelled job again: only its undelivered deliveries when its outputs are stored."""
        job = self.get(job_id)
        if job.state not in ("failed", "cancelled", "retrying"):
            raise JobError(f"job {job_id} is {job.state}; only failed, cancelled or retrying jobs can be retried")
        if job.outputs.get("stored") and any(d["state"] != "done" for d in job.destinations.values()):
            destinations = {n: (d if d["state"] == "done" else {"state": "pending", "attempts": 0})
                            for n, d in job.destinations.items()}
            self.update(job_id, state="forwarding", step="forwarding", error=None, destinations=destinations)
        else:
            self.update(job_id, state="queued", step="", progress=0.0, error=None, next_attempt_at=None)
        return self.get(job_id)

    # --- small settings (the /changes cursor, the rules status) --------------------------------

    def get_setting(self, key: str, default: Any = None) -> Any:
        with self._connect() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        with self._write() as db:
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                       (key, json.dumps(value)))


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    for key in _JSON_COLUMNS:
        if values[key] is not None:
            values[key] = json.loads(values[key])
    return Job(**values)
