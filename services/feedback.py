"""Human feedback as preference data (the reward-model data of the RLHF papers).

Two kinds of record: a rating of one completion (+1 / -1), or a ranking of several completions
of one prompt, best first, optionally with ties. ``pairwise()`` turns them into
``{prompt, chosen, rejected}`` pairs, the format TRL's reward and DPO trainers load:
a ranking of N completions gives N·(N−1)/2 pairs (none inside a tie group); ratings pair every
completion with a positive net rating with every one with a negative net rating, per prompt.

Every record carries its ``owner`` (the API key's name; NULL for records written before owners
existed), and an export can be limited to one owner.

SQLite in WAL mode. Writers in one process take turns on one connection behind a lock, so they
queue in memory instead of in SQLite's busy handler (whose sleeps grow to 100 ms); the busy
timeout is only for writers in other processes. Reads use pooled connections of their own, and
an export is read in one transaction: a consistent snapshot, returned whole.
"""

from __future__ import annotations

import itertools
import json
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
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
POOLED_READERS = 4


class FeedbackStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._writer = self._open()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._writer.execute("PRAGMA journal_mode=WAL")
        if not self._up_to_date(self._writer):
            with self._writing() as db:  # statement by statement: executescript would COMMIT
                for statement in SCHEMA:
                    db.execute(statement)
                self._migrate(db)

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

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the shared writer connection; writers queue on the lock."""
        with self._write_lock:
            db = self._writer
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

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
        with self._writing() as db:
            cursor = db.execute(
                f"INSERT INTO feedback ({', '.join(row)}, created) VALUES "
                f"({', '.join('?' * len(row))}, ?)",
                [*row.values(), time.time()],
            )
        return int(cursor.lastrowid or 0)

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

    def close(self) -> None:
        """Close every connection; the store cannot be used afterwards."""
        with self._write_lock:
            self._writer.close()
        while True:
            try:
                self._readers.get_nowait().close()
            except queue.Empty:
                return
