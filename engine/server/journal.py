"""The server's journal: accepted jobs survive a crash of the process.

Generation is deterministic in (request, seeds, model): a job that was accepted but not finished when the process
died (``kill -9``, an OOM kill, a power cut of the container) can be run again after a restart and gives the image it
would have given. The journal is a SQLite database in the server's state folder (``dreamfuse serve --state-dir``):

* ``accept``: before a job is queued, its kind, its fields (JSON), the bytes of the images it uploaded (files next
  to the database, so a restart decodes exactly what the request sent), its resolved seeds, priority and absolute
  deadline, and the model it was accepted for;
* ``finish``: when it ends, its state and reason, and for a finished job its images as PNG files;
* after a restart, :meth:`Journal.unfinished` lists what must run again (``dreamfuse serve`` resubmits it under the
  same job id: ``GET /v1/jobs/{id}`` answers as if nothing happened); a job that cannot run again -- the server now
  serves another model, its upload is gone -- ends ``failed`` with a reason that says it was lost in a restart, and
  only then;
* finished jobs stay answerable (``GET /v1/jobs/{id}``, its images) from the journal after they leave the
  scheduler's memory, up to ``keep`` of them (the oldest are pruned with their files).

SQLite in WAL mode with ``synchronous=NORMAL``: a committed transaction survives the process being killed at any
point (only an operating-system crash can lose the last ones). Writes happen under one lock; image files are written
to a temporary name and renamed, then the row is committed, so a row never points at a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = 1
LOST = "lost in a restart"
_TERMINAL = ("done", "cancelled", "timed_out", "failed")


@dataclass
class Record:
    """One journal row."""

    id: str
    kind: str
    fields: dict
    uploads: dict[str, Path]
    seeds: list[int]
    priority: int
    deadline: float | None
    """Wall-clock time (``time.time()``) past which the job is dropped, or None."""
    state: str
    error: str | None
    created: float
    finished: float | None
    images: int
    model: str
    idempotency_key: str | None = None


@dataclass
class StoredJob:
    """A finished job answered from the journal (the scheduler has forgotten it, or the process restarted): the
    attributes of a scheduler ``Job`` that the HTTP layer reads."""

    id: str
    kind: str
    state: str
    seeds: list[int]
    created: float
    finished: float | None
    error: str | None
    pngs: list[bytes] | None = None
    step: int = 0
    steps: int = 0
    images: list | None = None
    _events: list[dict] = field(default_factory=list)

    def done(self) -> bool:
        return self.state in _TERMINAL

    def cancel(self, reason: str = "") -> None:  # finished: nothing to cancel
        return None

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def events_since(self, index: int, timeout: float | None = None) -> list[dict]:
        event = {"type": self.state} if self.state == "done" else {"type": self.state, "reason": self.error}
        return [event][index:]


class Journal:
    """The SQLite journal of one server (see the module docs).

    Args:
        folder: the state folder (created; holds ``journal.sqlite3``, ``inputs/``, ``results/``).
        model: what the server serves (the model, its variant, LoRAs, adapters...): jobs accepted for another model
            are not run again.
        keep: finished jobs kept answerable (the oldest are pruned).
    """

    def __init__(self, folder: str | Path, model: str, keep: int = 1024):
        self.folder = Path(folder).expanduser()
        self.model = str(model)
        self.keep = int(keep)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"state_dir: {str(self.folder)!r} is a file, not a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "inputs").mkdir(exist_ok=True)
            (self.folder / "results").mkdir(exist_ok=True)
        except OSError as e:
            raise ValueError(f"state_dir: cannot use {str(self.folder)!r} ({e.strerror or e})") from None
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.folder / "journal.sqlite3"), check_same_thread=False,
                                       isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, fields TEXT NOT NULL, "
                "uploads TEXT NOT NULL, seeds TEXT NOT NULL, priority INTEGER NOT NULL, deadline REAL, "
                "state TEXT NOT NULL, error TEXT, created REAL NOT NULL, finished REAL, images INTEGER NOT NULL, "
                "model TEXT NOT NULL, idempotency_key TEXT)")
            self._db.execute("CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished)")
            self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs (idempotency_key)")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
            elif row[0] != str(SCHEMA):
                raise ValueError(f"state_dir: {str(self.folder)!r} holds a journal of format {row[0]}; this dreamfuse "
                                 f"writes format {SCHEMA} (use another --state-dir)")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"state_dir: {str(self.folder / 'journal.sqlite3')!r} is not a readable journal "
                             f"({e})") from None

    # ------------------------------------------------------------------------------------------- writing
    def accept(self, job_id: str, kind: str, fields: dict, uploads: dict[str, bytes], seeds: list[int],
               priority: int, deadline: float | None, idempotency_key: str | None = None) -> None:
        """Record an accepted job before it is queued (its upload bytes as files first)."""
        names = {}
        if uploads:
            folder = self.folder / "inputs" / job_id
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in uploads.items():
                path = folder / name
                _write_atomic(path, data)
                names[name] = name
        with self._lock:
            self._db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', NULL, ?, NULL, 0, ?, ?)",
                             (job_id, kind, json.dumps(fields), json.dumps(names), json.dumps(seeds), int(priority),
                              deadline, time.time(), self.model, idempotency_key))

    def forget(self, job_id: str) -> None:
        """Drop a job that was recorded but not queued after all (refused by the scheduler)."""
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.folder / "inputs" / job_id, ignore_errors=True)

    def finish(self, job_id: str, state: str, error: str | None = None, pngs: list[bytes] | None = None) -> None:
        """Record a job's end (its PNGs for a finished one); its uploads are no longer needed."""
        count = 0
        if state == "done" and pngs:
            folder = self.folder / "results" / job_id
            folder.mkdir(parents=True, exist_ok=True)
            for i, data in enumerate(pngs):
                _write_atomic(folder / f"{i}.png", data)
            count = len(pngs)
        with self._lock:
            self._db.execute("UPDATE jobs SET state = ?, error = ?, finished = ?, images = ? WHERE id = ?",
                             (state, error, time.time(), count, job_id))
        shutil.rmtree(self.folder / "inputs" / job_id, ignore_errors=True)
        self._prune()

    def _prune(self) -> None:
        with self._lock:
            old = [r[0] for r in self._db.execute(
                "SELECT id FROM jobs WHERE finished IS NOT NULL ORDER BY finished DESC LIMIT -1 OFFSET ?",
                (self.keep,))]
            if not old:
                return
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in old])
        for job_id in old:
            shutil.rmtree(self.folder / "results" / job_id, ignore_errors=True)
            shutil.rmtree(self.folder / "inputs" / job_id, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- reading
    def _record(self, row) -> Record:
        (job_id, kind, fields, uploads, seeds, priority, deadline, state, error, created, finished, images, model,
         key) = row
        folder = self.folder / "inputs" / job_id
        return Record(job_id, kind, json.loads(fields), {k: folder / v for k, v in json.loads(uploads).items()},
                      json.loads(seeds), priority, deadline, state, error, created, finished, images, model, key)

    def unfinished(self) -> list[Record]:
        """Jobs accepted and not finished, in the order they were accepted."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE finished IS NULL ORDER BY created").fetchall()
        return [self._record(r) for r in rows]

    def record(self, job_id: str) -> Record | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._record(row)

    def by_key(self, key: str) -> Record | None:
        """The job accepted under an idempotency key, if any."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
        return None if row is None else self._record(row)

    def stored(self, job_id: str) -> StoredJob | None:
        """A finished job as the HTTP layer reads jobs (None when unknown or not finished)."""
        rec = self.record(job_id)
        if rec is None or rec.finished is None:
            return None
        pngs = None
        if rec.state == "done":
            folder = self.folder / "results" / job_id
            try:
                pngs = [(folder / f"{i}.png").read_bytes() for i in range(rec.images)]
            except OSError as e:
                return StoredJob(rec.id, rec.kind, "failed", rec.seeds, rec.created, rec.finished,
                                 f"{LOST}: its images are gone from the state folder ({e.strerror or e})")
        steps = int(rec.fields.get("steps") or 0)
        return StoredJob(rec.id, rec.kind, rec.state, rec.seeds, rec.created, rec.finished, rec.error, pngs,
                         step=steps if rec.state == "done" else 0, steps=steps)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_state_dir(host: str, port: int) -> Path:
    """``$XDG_STATE_HOME/dreamfuse/serve-HOST-PORT`` (``~/.local/state/...`` without it): one journal per address."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
    return base / "dreamfuse" / f"serve-{safe}-{port}"


__all__ = ["LOST", "Journal", "Record", "StoredJob", "default_state_dir"]
