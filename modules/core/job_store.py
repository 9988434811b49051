"""The persistent job store: every queued job and its history, in SQLite (stdlib ``sqlite3``, WAL).

One row per job: who submitted it, its kind (a string: "txt2img", "img2img", "extras", "merge"...)
with a JSON body a runner rebuilds the job from, its status and timestamps, its output files with
their infotexts, and the error if any. Crash safety (a kill -9 at any moment):

- WAL with ``synchronous=FULL``: every commit is on disk when it returns, and state changes
  (submit, start, each saved file, finish) are one commit each;
- output files are written (atomically, core/atomic.py) before the row that names them;
- on the next start, :meth:`JobStore.recover` marks the jobs that were running "interrupted";
  the queued ones stay queued for the queue service to submit again.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["JobRecord", "JobOutput", "JobStore", "HistoryQuery", "FINISHED", "UNFINISHED"]

FINISHED = ("done", "failed", "cancelled", "interrupted")
UNFINISHED = ("queued", "running")
SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    owner TEXT,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    detached INTEGER NOT NULL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    info TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner_finished ON jobs(owner, finished_at);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at);
CREATE TABLE IF NOT EXISTS outputs (
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    path TEXT NOT NULL,
    infotext TEXT NOT NULL DEFAULT '',
    grid INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, n)
);
CREATE TABLE IF NOT EXISTS paused (owner TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class JobOutput:
    path: str
    infotext: str = ""
    grid: bool = False


@dataclass
class JobRecord:
    id: str
    owner: str | None
    source: str                 # "ui", "api" (/sdapi/v1: its client waits), "queue-api" (/queue/v1)
    kind: str
    body: dict[str, Any]
    detached: bool              # outlives its client: queued again after a restart
    status: str = "queued"
    prompt: str = ""
    model: str = ""
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    info: str | None = None
    seq: int = 0
    outputs: list[JobOutput] = field(default_factory=list)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex


@dataclass
class HistoryQuery:
    """A page of finished jobs: newest first, ``owner`` None = everybody's (admins)."""
    owner: str | None = None
    statuses: tuple[str, ...] = FINISHED
    search: str = ""            # a substring of the prompt, case-insensitive
    model: str = ""             # exact model name
    date_from: float | None = None   # finished_at >= (epoch seconds)
    date_to: float | None = None     # finished_at < (epoch seconds)
    limit: int = 24
    offset: int = 0


_COLUMNS = ("id, seq, owner, source, kind, body, detached, status, prompt, model, submitted_at, started_at, "
            "finished_at, error, info")


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class JobStore:
    """The SQLite file; thread-safe (one connection behind a lock: writes are few and short)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")   # a commit is on disk when it returns
            self._db.executescript(SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ---------------------------------------------------------------------------
    def _write(self, sql: str, args: Iterable[Any] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, tuple(args)).rowcount

    def insert(self, rec: JobRecord) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
            rec.seq = int(row[0])
            self._db.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.id, rec.seq, rec.owner, rec.source, rec.kind, json.dumps(rec.body, default=str), int(rec.detached),
                 rec.status, rec.prompt, rec.model, rec.submitted_at, rec.started_at, rec.finished_at,
                 rec.error, rec.info))
        return rec

    def mark_started(self, job_id: str, at: float | None = None) -> None:
        self._write("UPDATE jobs SET status='running', started_at=? WHERE id=?", (at or time.time(), job_id))

    def mark_finished(self, job_id: str, status: str, *, error: str | None = None, info: str | None = None,
                      model: str | None = None, at: float | None = None) -> None:
        self._write("UPDATE jobs SET status=?, finished_at=?, error=?, info=COALESCE(?, info), "
                    "model=COALESCE(NULLIF(?, ''), model) WHERE id=?",
                    (status, at or time.time(), error, info, model or "", job_id))

    def requeue(self, job_id: str) -> None:
        self._write("UPDATE jobs SET status='queued', started_at=NULL WHERE id=?", (job_id,))

    def add_output(self, job_id: str, output: JobOutput) -> None:
        """Name one saved file (written before this call) as an output of the job."""
        with self._lock:
            n = self._db.execute("SELECT COALESCE(MAX(n), -1) + 1 FROM outputs WHERE job_id=?", (job_id,)).fetchone()[0]
            self._db.execute("INSERT INTO outputs(job_id, n, path, infotext, grid) VALUES (?, ?, ?, ?, ?)",
                             (job_id, n, output.path, output.infotext or "", int(output.grid)))

    def reorder(self, job_ids: list[str]) -> None:
        """Give these jobs their places in this order (their own seq values, re-dealt), in one transaction."""
        if not job_ids:
            return
        with self._lock:
            marks = ", ".join("?" * len(job_ids))
            seqs = sorted(r[0] for r in self._db.execute(f"SELECT seq FROM jobs WHERE id IN ({marks})", job_ids))
            if len(seqs) != len(job_ids):
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for job_id, seq in zip(job_ids, seqs):
                    self._db.execute("UPDATE jobs SET seq=? WHERE id=?", (seq, job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, job_id: str) -> list[JobOutput]:
        """Remove the job's row; returns its outputs (the caller removes the files)."""
        with self._lock:
            outs = self.outputs(job_id)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM outputs WHERE job_id=?", (job_id,))
                self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return outs

    def set_paused(self, owner: str, paused: bool) -> None:
        if paused:
            self._write("INSERT OR IGNORE INTO paused(owner) VALUES (?)", (owner,))
        else:
            self._write("DELETE FROM paused WHERE owner=?", (owner,))

    def paused_owners(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT owner FROM paused")}

    # -- reading ---------------------------------------------------------------------------
    def _record(self, row: sqlite3.Row, outputs: list[JobOutput] | None = None) -> JobRecord:
        try:
            body = json.loads(row["body"])
        except (TypeError, ValueError):
            body = {}
        return JobRecord(id=row["id"], seq=row["seq"], owner=row["owner"], source=row["source"], kind=row["kind"],
                         body=body, detached=bool(row["detached"]), status=row["status"], prompt=row["prompt"],
                         model=row["model"], submitted_at=row["submitted_at"], started_at=row["started_at"],
                         finished_at=row["finished_at"], error=row["error"], info=row["info"],
                         outputs=outputs if outputs is not None else [])

    def outputs(self, job_id: str) -> list[JobOutput]:
        with self._lock:
            return [JobOutput(path=r["path"], infotext=r["infotext"], grid=bool(r["grid"])) for r in
                    self._db.execute("SELECT path, infotext, grid FROM outputs WHERE job_id=? ORDER BY n", (job_id,))]

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
            return None if row is None else self._record(row, self.outputs(job_id))

    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs, in submission order (``seq``)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status IN ('queued', 'running') ORDER BY seq")
            return [self._record(r) for r in rows.fetchall()]

    def list(self, *, owner: str | None = None, statuses: Iterable[str] | None = None, limit: int = 100,
             offset: int = 0, newest_first: bool = False) -> list[JobRecord]:
        where, args = self._filters(owner=owner, statuses=statuses)
        order = "seq DESC" if newest_first else "seq"
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY {order} LIMIT ? OFFSET ?",
                                    (*args, int(limit), int(offset))).fetchall()
            return [self._record(r) for r in rows]

    def history(self, query: HistoryQuery) -> tuple[list[JobRecord], int]:
        """A page of finished jobs (newest first) with their outputs, and how many match in all."""
        where, args = self._filters(owner=query.owner, statuses=query.statuses, search=query.search,
                                    model=query.model, date_from=query.date_from, date_to=query.date_to)
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY finished_at DESC, seq DESC LIMIT ? OFFSET ?",
                (*args, max(0, int(query.limit)), max(0, int(query.offset)))).fetchall()
            return [self._record(r, self.outputs(r["id"])) for r in rows], int(total)

    def models(self, owner: str | None = None) -> list[str]:
        """The model names in the history (for the filter's choices)."""
        where, args = self._filters(owner=owner, statuses=FINISHED)
        with self._lock:
            return [r[0] for r in self._db.execute(
                f"SELECT DISTINCT model FROM jobs {where} {'AND' if where else 'WHERE'} model != '' ORDER BY model",
                args)]

    @staticmethod
    def _filters(*, owner: str | None = None, statuses: Iterable[str] | None = None, search: str = "",
                 model: str = "", date_from: float | None = None, date_to: float | None = None
                 ) -> tuple[str, tuple[Any, ...]]:
        clauses: list[str] = []
        args: list[Any] = []
        if owner is not None:
            clauses.append("owner = ?")
            args.append(owner)
        statuses = tuple(statuses or ())
        if statuses:
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        if search:
            clauses.append("prompt LIKE ? ESCAPE '\\'")
            args.append(f"%{_escape_like(search)}%")
        if model:
            clauses.append("model = ?")
            args.append(model)
        if date_from is not None:
            clauses.append("finished_at >= ?")
            args.append(float(date_from))
        if date_to is not None:
            clauses.append("finished_at < ?")
            args.append(float(date_to))
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)

    # -- startup ---------------------------------------------------------------------------
    def recover(self) -> list[JobRecord]:
        """After a restart: jobs that were running are marked interrupted (returned), in one commit."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status='running' ORDER BY seq").fetchall()
            now = time.time()
            self._db.execute("UPDATE jobs SET status='interrupted', finished_at=?, "
                             "error=COALESCE(error, 'the server stopped while this job ran') WHERE status='running'",
                             (now,))
            return [self._record(r) for r in rows]
