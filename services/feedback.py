"""Human feedback as preference data (the reward-model data of the RLHF papers).

Two kinds of record: a rating of one completion (+1 / -1), or a ranking of several completions
of one prompt, best first, optionally with ties. ``pairwise()`` turns them into
``{prompt, chosen, rejected}`` pairs, the format TRL's reward and DPO trainers load:
a ranking of N completions gives N·(N−1)/2 pairs (none inside a tie group); ratings pair every
completion with a positive net rating with every one with a negative net rating, per prompt.

Every record carries its ``owner`` (the API key's name; NULL for records written before owners
existed), and an export can be limited to one owner.

The records live in a ``Database`` (``services/storage.py``): a SQLite file by default,
PostgreSQL for several workers and replicas. Writers in one process commit together (group
commit): the rows queued while one batch is written go in the next transaction, so on SQLite they
queue in memory instead of in SQLite's busy handler, whose sleeps grow to 100 ms, and on
PostgreSQL 64 writers cost a few commits, not 64. An export is read in one snapshot, returned
whole.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkit.services.storage import (
    BUSY_TIMEOUT_MS,
    Database,
    Migration,
    add_column,
    migrate,
    open_database,
    statements,
    use_wal,
    when_free,
    write_transaction,
)

__all__ = [  # the SQLite helpers stay importable from here, where they were first
    "BUSY_TIMEOUT_MS",
    "FeedbackStore",
    "to_pairs",
    "use_wal",
    "when_free",
    "write_transaction",
]

MIGRATIONS = [
    Migration(
        1,
        "ratings and rankings",
        statements(
            """CREATE TABLE IF NOT EXISTS feedback (
    id {id}, kind TEXT NOT NULL CHECK (kind IN ('rating', 'ranking')),
    prompt TEXT NOT NULL, completion TEXT, rating INTEGER, ranking TEXT, ties TEXT,
    comment TEXT, labeler TEXT NOT NULL, created {real} NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS feedback_by_prompt ON feedback(prompt)",
        ),
    ),
    Migration(2, "owners (older rows keep owner NULL)", add_column("feedback", "owner", "TEXT")),
    Migration(
        3,
        "exports by owner",
        statements("CREATE INDEX IF NOT EXISTS feedback_by_owner ON feedback(owner, kind, id)"),
    ),
]


AI_LABELER = "ai:"  # labelers of AI feedback are ai:<model>


@dataclass
class PendingWrite:
    row: dict[str, Any]
    rowid: int = 0
    error: BaseException | None = None
    done: bool = False


class FeedbackStore:
    """Ratings and rankings in a ``Database``: a SQLite file (a path) or PostgreSQL (a
    ``postgresql://`` URL, or a Database shared with other stores, which the caller closes)."""

    def __init__(self, path: Database | Path | str) -> None:
        self.database = open_database(path)
        self._owns_database = self.database is not path
        self.path = getattr(self.database, "path", None)  # the SQLite file; None on PostgreSQL
        self._batches = threading.Condition()  # guards the queue; see _insert
        self._queue: list[PendingWrite] = []
        self._writing_batch = False
        migrate(self.database, "feedback", MIGRATIONS)

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
        """One transaction for the batch."""
        try:
            with self.database.transaction() as db:
                for write in batch:
                    db.execute("SAVEPOINT row")
                    try:
                        write.rowid = int(
                            db.execute(
                                f"INSERT INTO feedback ({', '.join(write.row)}, created) VALUES "
                                f"({', '.join('?' * len(write.row))}, ?) RETURNING id",
                                [*write.row.values(), time.time()],
                            ).fetchone()[0]
                        )
                    except self.database.Error as error:
                        db.execute("ROLLBACK TO SAVEPOINT row")
                        write.error = error
                    db.execute("RELEASE SAVEPOINT row")
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
        with self.database.read() as db:
            return int(db.execute(f"SELECT count(*) FROM feedback{where}", args).fetchone()[0])

    def add_rankings(self, rankings: list[dict[str, Any]]) -> list[int]:
        """Record several rankings (``add_ranking``'s arguments as dicts) all or none: every
        one is checked first, then all are written in one transaction."""
        rows = []
        for ranking in rankings:
            order, ties = ranking["ranking"], ranking.get("ties") or []
            if len(order) < 2 or len(set(order)) != len(order):
                raise ValueError("a ranking needs at least two different completions")
            if any(not set(g) <= set(order) or len(g) < 2 for g in ties):
                raise ValueError("each tie group must name two or more completions of the ranking")
            rows.append(
                {
                    "kind": "ranking",
                    "prompt": ranking["prompt"],
                    "ranking": json.dumps(order),
                    "ties": json.dumps(ties),
                    "labeler": ranking["labeler"],
                    "comment": ranking.get("comment"),
                    "owner": ranking.get("owner"),
                }
            )
        ids = []
        with self.database.transaction() as db:
            for row in rows:
                cursor = db.execute(
                    f"INSERT INTO feedback ({', '.join(row)}, created) VALUES "
                    f"({', '.join('?' * len(row))}, ?) RETURNING id",
                    [*row.values(), time.time()],
                )
                ids.append(int(cursor.fetchone()[0]))
        return ids

    def pairwise(self, owner: str | None = None, kind: str = "all") -> list[dict[str, str]]:
        """Preference pairs, preferred completion first (``chosen``), from one snapshot.

        ``owner=None`` exports everyone's records (admins); otherwise only that owner's. ``kind``
        is ``human``, ``ai`` (labelers ``ai:<model>``, from ``agentkit feedback ai-label``) or
        ``all``. The list is complete for the moment the read began: writes that land meanwhile
        are not in it.
        """
        if kind not in ("human", "ai", "all"):
            raise ValueError("kind must be human, ai or all")
        where, args = ("", ()) if owner is None else (" AND owner = ?", (owner,))
        if kind != "all":
            where += f" AND labeler {'NOT ' if kind == 'human' else ''}LIKE ?"
            args = (*args, AI_LABELER + "%")
        with self.database.snapshot() as db:  # both SELECTs read the same snapshot
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
        return to_pairs(rankings, ratings)

    def close(self) -> None:
        """Close the database unless it was handed in; the store cannot be used afterwards."""
        if self._owns_database:
            self.database.close()


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
