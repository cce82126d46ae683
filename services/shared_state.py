"""What the API's workers and replicas share besides conversations and feedback: document jobs,
rate-limit counters and the owners of uploaded files, in one Database (``services/storage.py``).

- ``JobStore``: a job's record (``id``, ``kind``, ``owner``, ``state``, ``summary``/``error``)
  is a row, so a job started by one worker is followed from any other. The worker that runs it
  (host and process id) is recorded; a job whose worker died stays ``running``.
- ``SharedRateLimiter``: at most ``per_minute`` requests per key in any sliding minute, counted
  in the database (one row per request, older than a minute deleted as the key comes back), so
  the limit holds across workers and replicas. Each key's check is one transaction, serialized
  per key (an advisory lock on PostgreSQL, the writer lock on SQLite). Clocks: wall time, which
  the machines of a deployment are expected to agree on (NTP).
- ``UploadOwnerStore``: which key uploaded each file (``UploadOwners``' interface).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkit.services.keys import KeyStore
from agentkit.services.storage import (
    Database,
    Migration,
    add_column,
    migrate,
    open_database,
    statements,
)

MIGRATIONS = [
    Migration(
        1,
        "jobs, rate-limit hits, upload owners",
        statements(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT, "
            "state TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed')), summary TEXT, "
            "error TEXT, worker TEXT NOT NULL, created {real} NOT NULL, updated {real} NOT NULL)",
            "CREATE TABLE IF NOT EXISTS rate_limit_hits (id {id}, api_key TEXT NOT NULL, "
            "at {real} NOT NULL)",
            "CREATE INDEX IF NOT EXISTS rate_limit_hits_by_key ON rate_limit_hits(api_key, at)",
            "CREATE TABLE IF NOT EXISTS upload_owners (name TEXT PRIMARY KEY, owner TEXT)",
        ),
    ),
    Migration(
        2, "a job's progress (files done and total, chunks)", add_column("jobs", "progress", "TEXT")
    ),  # fmt: skip
]


class SharedStore:
    """A store on a Database handed in (the caller closes it) or opened from a path or URL."""

    def __init__(self, target: Database | Path | str) -> None:
        self.database = open_database(target)
        self._owns_database = self.database is not target
        migrate(self.database, "shared_state", MIGRATIONS)

    def close(self) -> None:
        if self._owns_database:
            self.database.close()


class JobStore(SharedStore):
    def create(self, job_id: str, kind: str, owner: str | None) -> dict[str, Any]:
        now = time.time()
        with self.database.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, kind, owner, state, worker, created, updated) "
                "VALUES (?, ?, ?, 'running', ?, ?, ?)",
                (job_id, kind, owner, f"{socket.gethostname()}:{os.getpid()}", now, now),
            )
        return {"id": job_id, "kind": kind, "owner": owner, "state": "running",
                "summary": None, "error": None, "progress": None}  # fmt: skip

    def finish(self, job_id: str, *, summary: dict[str, Any] | None = None,
               error: str | None = None) -> None:  # fmt: skip
        """The job is done (``summary``) or failed (``error``)."""
        state = "failed" if error is not None else "done"
        with self.database.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, summary = ?, error = ?, updated = ? WHERE id = ?",
                (state, None if summary is None else json.dumps(summary), error, time.time(),
                 job_id),
            )  # fmt: skip

    def progress(self, job_id: str, progress: dict[str, int]) -> None:
        """How far the job has come (files done and total, chunks embedded)."""
        with self.database.transaction() as db:
            db.execute(
                "UPDATE jobs SET progress = ?, updated = ? WHERE id = ?",
                (json.dumps(progress), time.time(), job_id),
            )

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.database.read() as db:
            row = db.execute(
                "SELECT id, kind, owner, state, summary, error, progress FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        id_, kind, owner, state, summary, error, progress = row
        return {"id": id_, "kind": kind, "owner": owner, "state": state,
                "summary": json.loads(summary) if summary else None, "error": error,
                "progress": json.loads(progress) if progress else None}  # fmt: skip


class SharedRateLimiter(SharedStore):
    """``RateLimiter``'s ``allow`` with the counts in the database; see the module's docstring."""

    def __init__(
        self, target: Database | Path | str, per_minute: int,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        super().__init__(target)
        self.per_minute, self.clock = per_minute, clock

    def allow(self, key: str) -> bool:
        """Whether ``key`` may make a request now (and, if so, count it)."""
        if not self.per_minute:
            return True
        now = self.clock()
        with self.database.transaction() as db:
            if self.database.dialect == "postgresql":
                db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"rate:{key}",))
            db.execute("DELETE FROM rate_limit_hits WHERE api_key = ? AND at <= ?", (key, now - 60))
            (count,) = db.execute(
                "SELECT count(*) FROM rate_limit_hits WHERE api_key = ?", (key,)
            ).fetchone()
            if count >= self.per_minute:
                return False
            db.execute("INSERT INTO rate_limit_hits (api_key, at) VALUES (?, ?)", (key, now))
            return True


class UploadOwnerStore(SharedStore):
    """Which key uploaded each file of the upload folder (``UploadOwners``' interface); files
    without an owner belong to admins."""

    def owner_of(self, name: str) -> str | None:
        with self.database.read() as db:
            row = db.execute("SELECT owner FROM upload_owners WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set(self, name: str, owner: str | None) -> None:
        with self.database.transaction() as db:
            if owner is None:
                db.execute("DELETE FROM upload_owners WHERE name = ?", (name,))
            else:
                db.execute(
                    "INSERT INTO upload_owners (name, owner) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner",
                    (name, owner),
                )


@dataclass
class SharedState:
    """What ``create_app`` shares with the other workers and replicas through the database:
    keys added with ``agentkit keys add``, and (with several workers) jobs, rate-limit counts
    and upload owners. A field left None keeps that state in the process, as one worker may."""

    keys: KeyStore | None = None
    jobs: JobStore | None = None
    limiter: SharedRateLimiter | None = None
    uploads: UploadOwnerStore | None = None
