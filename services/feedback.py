"""Human feedback as preference data (the reward-model data of the RLHF papers).

Two kinds of record: a rating of one completion (+1 / -1), or a ranking of several completions
of one prompt, best first, optionally with ties. ``pairwise()`` turns them into
``{prompt, chosen, rejected}`` pairs, the format TRL's reward and DPO trainers load:
a ranking of N completions gives N·(N−1)/2 pairs (none inside a tie group); ratings pair every
completion with a positive net rating with every one with a negative net rating, per prompt.

Every record carries its ``owner`` (the API key's name; NULL for records written before owners
existed), and an export can be limited to one owner.

SQLite in WAL mode. Writers in one process share one connection behind a lock and commit together
(group commit), so they queue in memory instead of in SQLite's busy handler, whose sleeps grow to
100 ms; only writers in other processes are waited for there, up to a busy timeout. Reads use
pooled connections of their own, and an export is read in one transaction: a consistent
snapshot, returned whole.
"""

from __future__ import annotations

import itertools
import json
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('rating', 'ranking')),
    prompt TEXT NOT NULL, completion TEXT, rating INTEGER, ranking TEXT, ties TEXT,
    comment TEXT, labeler TEXT NOT NULL, created REAL NOT NULL, owner TEXT)""",
    "CREATE INDEX IF NOT EXISTS feedback_by_prompt ON feedback(prompt)",
]
OWNER_INDEX = "CREATE INDEX IF NOT EXISTS feedback_by_owner ON feedback(owner, kind, id)"
BUSY_TIMEOUT_MS = 30_000
BUSY_POLL_S = (0.0001, 0.002)  # first and longest pause between tries for another process's lock
POOLED_READERS = 4


def when_free(statement: Callable[[], object]) -> None:
    """Run ``statement``, retrying while another process holds the lock, up to the busy timeout.

    SQLite's own busy handler sleeps up to 100 ms at a time, long after the lock is free; only
    one thread per process waits here (the others queue on the writer lock), so polling every
    2 ms at most costs nothing.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = BUSY_POLL_S[0]
    while True:
        try:
            statement()
            return
        except sqlite3.OperationalError as error:
            busy = "locked" in str(error) or "busy" in str(error)
            if not busy or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, BUSY_POLL_S[1])


@contextmanager
def write_transaction(
    db: sqlite3.Connection, lock: threading.Lock | None = None
) -> Iterator[sqlite3.Connection]:
    """One writer of this process at a time (``lock``, unless the caller holds one already) in
    ``BEGIN IMMEDIATE`` on ``db`` (other processes waited for in short steps): COMMIT at the
    end, ROLLBACK on an error."""
    with lock or nullcontext():
        when_free(lambda: db.execute("BEGIN IMMEDIATE"))
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL. Run it under ``when_free``: SQLite does not always wait here for
    another process opening the same new file, it answers "database is locked" at once."""
    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        db.execute("PRAGMA journal_mode=WAL")


@dataclass
class PendingWrite:
    row: dict[str, Any]
    rowid: int = 0
    error: BaseException | None = None
    done: bool = False


class FeedbackStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()  # guards the writer connection
        self._batches = threading.Condition()  # guards the queue; see _insert
        self._queue: list[PendingWrite] = []
        self._writing_batch = False
        self._writer = self._open()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        when_free(lambda: use_wal(self._writer))
        if not self._up_to_date(self._writer):
            with self._write_lock, self._writing() as db:
                for statement in SCHEMA:  # one by one: executescript would COMMIT
                    db.execute(statement)
                self._migrate(db)
        self._writer.execute("PRAGMA busy_timeout=0")  # when_free waits, in shorter steps

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return db

    @staticmethod
    def _up_to_date(db: sqlite3.Connection) -> bool:
        """The schema is current (the owner index is made last), so opening writes nothing."""
        found = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'feedback_by_owner'")
        return found.fetchone() is not None

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Databases from before owners get the column; their rows keep owner NULL."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(feedback)")}
        if "owner" not in columns:
            db.execute("ALTER TABLE feedback ADD COLUMN owner TEXT")
        db.execute(OWNER_INDEX)

    def _writing(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction on the writer connection; the caller holds the writer lock."""
        return write_transaction(self._writer)

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read connection of this thread's own for the block (pooled, any thread)."""
        try:
            db = self._readers.get_nowait()
        except queue.Empty:
            db = self._open()
        try:
            yield db
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if self._readers.qsize() < POOLED_READERS:
                self._readers.put(db)
            else:
                db.close()

    def _insert(self, **row: Any) -> int:
        """Queue the row; unless a batch is being written, write every queued row, else wait.

        Group commit: one thread at a time writes all the rows queued so far in one transaction
        (a savepoint each, so a bad row fails alone), so 64 waiting writers cost one commit, not
        64 one after another. Waiters sleep on a condition, not on the writer lock, so a row that
        is committed returns at once, whichever thread wrote it.
        """
        write, batch = PendingWrite(row), []
        with self._batches:
            self._queue.append(write)
            while self._writing_batch and not write.done:
                self._batches.wait()
            if not write.done:  # nobody is writing: this thread writes the batch
                batch, self._queue, self._writing_batch = self._queue, [], True
        if batch:
            try:
                with self._write_lock:
                    self._write_batch(batch)
            finally:
                with self._batches:
                    for pending in batch:
                        pending.done = True
                    self._writing_batch = False
                    self._batches.notify_all()
        if write.error is not None:
            raise write.error
        return write.rowid

    def _write_batch(self, batch: list[PendingWrite]) -> None:
        """One transaction for the batch; called with the writer lock held."""
        try:
            with self._writing() as db:
                for write in batch:
                    db.execute("SAVEPOINT row")
                    try:
                        cursor = db.execute(
                            f"INSERT INTO feedback ({', '.join(write.row)}, created) VALUES "
                            f"({', '.join('?' * len(write.row))}, ?)",
                            [*write.row.values(), time.time()],
                        )
                        write.rowid = int(cursor.lastrowid or 0)
                    except sqlite3.Error as error:
                        db.execute("ROLLBACK TO row")
                        write.error = error
                    db.execute("RELEASE row")
        except BaseException as error:  # nothing of the batch was committed
            for write in batch:
                write.error = write.error or error
            raise

    def add_rating(
        self,
        prompt: str,
        completion: str,
        rating: int,
        labeler: str,
        comment: str | None = None,
        owner: str | None = None,
    ) -> int:
        """Record a +1/-1 rating of one completion; ``owner`` is the API key's name."""
        if rating not in (1, -1):
            raise ValueError("rating must be 1 or -1")
        return self._insert(
            kind="rating",
            prompt=prompt,
            completion=completion,
            rating=rating,
            labeler=labeler,
            comment=comment,
            owner=owner,
        )

    def add_ranking(
        self,
        prompt: str,
        ranking: list[str],
        labeler: str,
        ties: list[list[str]] | None = None,
        comment: str | None = None,
        owner: str | None = None,
    ) -> int:
        """Record completions of one prompt, best first; ``owner`` is the API key's name."""
        if len(ranking) < 2 or len(set(ranking)) != len(ranking):
            raise ValueError("a ranking needs at least two different completions")
        for group in ties or []:
            if not set(group) <= set(ranking) or len(group) < 2:
                raise ValueError("each tie group must name two or more completions of the ranking")
        return self._insert(
            kind="ranking",
            prompt=prompt,
            ranking=json.dumps(ranking),
            ties=json.dumps(ties or []),
            labeler=labeler,
            comment=comment,
            owner=owner,
        )

    def count(self, owner: str | None = None) -> int:
        """Records stored: everyone's (``owner=None``) or one owner's."""
        where, args = ("", ()) if owner is None else (" WHERE owner = ?", (owner,))
        with self._reading() as db:
            return int(db.execute(f"SELECT count(*) FROM feedback{where}", args).fetchone()[0])

    def pairwise(self, owner: str | None = None) -> list[dict[str, str]]:
        """Preference pairs, preferred completion first (``chosen``), from one snapshot.

        ``owner=None`` exports everyone's records (admins); otherwise only that owner's. The list
        is complete for the moment the read began: writes that land meanwhile are not in it.
        """
        where, args = ("", ()) if owner is None else (" AND owner = ?", (owner,))
        with self._reading() as db:
            db.execute("BEGIN")  # deferred: both SELECTs read the same snapshot
            rankings = db.execute(
                f"SELECT prompt, ranking, ties FROM feedback WHERE kind = 'ranking'{where} "
                "ORDER BY id",
                args,
            ).fetchall()
            ratings = db.execute(
                f"SELECT prompt, completion, rating FROM feedback WHERE kind = 'rating'{where} "
                "ORDER BY id",
                args,
            ).fetchall()
            db.execute("COMMIT")
        return to_pairs(rankings, ratings)

    def close(self) -> None:
        """Close every connection; the store cannot be used afterwards."""
        with self._write_lock:
            self._writer.close()
        while True:
            try:
                self._readers.get_nowait().close()
            except queue.Empty:
                return


def to_pairs(
    rankings: list[tuple[str, str, str | None]], ratings: list[tuple[str, str, int]]
) -> list[dict[str, str]]:
    """Preference pairs from ranking rows ``(prompt, ranking JSON, ties JSON)`` and rating rows
    ``(prompt, completion, rating)``, preferred completion first (``chosen``)."""
    pairs: list[dict[str, str]] = []
    for prompt, ranking, ties in rankings:
        order = json.loads(ranking)
        tied = {c: i for i, group in enumerate(json.loads(ties or "[]")) for c in group}
        for better, worse in itertools.combinations(order, 2):
            if better in tied and tied.get(worse) == tied[better]:
                continue
            pairs.append({"prompt": prompt, "chosen": better, "rejected": worse})
    net: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for prompt, completion, rating in ratings:
        net[prompt][completion] += rating
    for prompt, scores in net.items():
        good = [c for c, s in scores.items() if s > 0]
        bad = [c for c, s in scores.items() if s < 0]
        for chosen, rejected in itertools.product(good, bad):
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs
