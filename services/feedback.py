"""Human feedback as preference data (the reward-model data of the RLHF papers).

Two kinds of record: a rating of one completion (+1 / -1), or a ranking of several completions
of one prompt, best first, optionally with ties. ``pairwise()`` turns them into
``{prompt, chosen, rejected}`` pairs, the format TRL's reward and DPO trainers load:
a ranking of N completions gives N·(N−1)/2 pairs (none inside a tie group); ratings pair every
completion with a positive net rating with every one with a negative net rating, per prompt.

SQLite in WAL mode, one short transaction per write, a busy timeout: concurrent writers wait
for each other and nothing is lost.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('rating', 'ranking')),
    prompt TEXT NOT NULL, completion TEXT, rating INTEGER, ranking TEXT, ties TEXT,
    comment TEXT, labeler TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_by_prompt ON feedback(prompt);
"""


class FeedbackStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def _insert(self, **row: Any) -> int:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            cursor = db.execute(
                f"INSERT INTO feedback ({', '.join(row)}, created) VALUES "
                f"({', '.join('?' * len(row))}, ?)",
                [*row.values(), time.time()],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return int(cursor.lastrowid or 0)

    def add_rating(
        self, prompt: str, completion: str, rating: int, labeler: str, comment: str | None = None
    ) -> int:
        if rating not in (1, -1):
            raise ValueError("rating must be 1 or -1")
        return self._insert(
            kind="rating",
            prompt=prompt,
            completion=completion,
            rating=rating,
            labeler=labeler,
            comment=comment,
        )

    def add_ranking(
        self,
        prompt: str,
        ranking: list[str],
        labeler: str,
        ties: list[list[str]] | None = None,
        comment: str | None = None,
    ) -> int:
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
        )

    def count(self) -> int:
        return int(self._connect().execute("SELECT count(*) FROM feedback").fetchone()[0])

    def pairwise(self) -> Iterator[dict[str, str]]:
        """Preference pairs, preferred completion first (``chosen``)."""
        db = self._connect()
        for prompt, ranking, ties in db.execute(
            "SELECT prompt, ranking, ties FROM feedback WHERE kind = 'ranking' ORDER BY id"
        ):
            order = json.loads(ranking)
            tied = {c: i for i, group in enumerate(json.loads(ties or "[]")) for c in group}
            for better, worse in itertools.combinations(order, 2):
                if better in tied and tied.get(worse) == tied[better]:
                    continue
                yield {"prompt": prompt, "chosen": better, "rejected": worse}
        net: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for prompt, completion, rating in db.execute(
            "SELECT prompt, completion, rating FROM feedback WHERE kind = 'rating' ORDER BY id"
        ):
            net[prompt][completion] += rating
        for prompt, scores in net.items():
            good = [c for c, s in scores.items() if s > 0]
            bad = [c for c, s in scores.items() if s < 0]
            for chosen, rejected in itertools.product(good, bad):
                yield {"prompt": prompt, "chosen": chosen, "rejected": rejected}
