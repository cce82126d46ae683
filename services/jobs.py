"""Document jobs (indexing a folder, adding uploads) run in the background, one thread each."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentkit.retrievers.indexer import ProgressFn
    from agentkit.services.shared_state import JobStore

PROGRESS_EVERY_S = 0.5


class JobRunner:
    """Index jobs in the background, a thread each. A job's record (``id``, ``kind``, ``owner``,
    ``state``: running, done or failed, ``summary`` or ``error``) is kept by id; ``report``
    rewrites what a record shows (e.g. absolute paths made relative). With a ``store``
    (``JobStore``) the records live in the database, so every worker and replica sees them."""

    def __init__(self, report: Callable[[str], str] = str, store: JobStore | None = None) -> None:
        self.report = report
        self.store = store
        self._jobs: dict[str, dict[str, Any]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(
        self, kind: str, owner: str | None, work: Callable[[ProgressFn], Any]
    ) -> dict[str, Any]:
        """Run ``work(progress)`` (returning a ``SyncSummary``) in a thread; the job's record as
        it starts. ``progress(files_done, files_total, chunks)``, called as files are indexed,
        shows in the record's ``progress`` (written to the store at most every
        ``PROGRESS_EVERY_S``)."""
        job_id = uuid.uuid4().hex[:16]
        record = {"id": job_id, "kind": kind, "owner": owner, "state": "running",
                  "summary": None, "error": None, "progress": None}  # fmt: skip
        if self.store is not None:
            self.store.create(job_id, kind, owner)
        else:
            self._jobs[job_id] = record
        written = [0.0]

        def progress(done: int, total: int, chunks: int) -> None:
            record["progress"] = {"files_done": done, "files_total": total, "chunks": chunks}
            now = time.monotonic()
            if self.store is not None and (done == total or now - written[0] >= PROGRESS_EVERY_S):
                written[0] = now
                self.store.progress(job_id, record["progress"])

        def run() -> None:
            try:
                summary = work(progress).to_dict()
                summary["index"] = Path(summary["index"]).name
                summary["warnings"] = [self.report(w) for w in summary["warnings"]]
                record.update(state="done", summary=summary)
            except Exception as error:  # the job reports it; the server stays up
                record.update(state="failed", error=self.report(str(error)) or type(error).__name__)
            if self.store is not None:
                self.store.finish(job_id, summary=record["summary"], error=record["error"])

        thread = threading.Thread(target=run, name=f"index-{job_id}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return dict(record)

    def get(self, job_id: str) -> dict[str, Any] | None:
        if self.store is not None:
            return self.store.get(job_id)
        record = self._jobs.get(job_id)
        return dict(record) if record is not None else None

    def running(self) -> list[threading.Thread]:
        with self._lock:
            return [t for t in self._threads if t.is_alive()]
