"""The storage interface: one contract for the stores on SQLite and on a real PostgreSQL server
(started by the tests, see pg_support.py), and versioned migrations (an old database upgraded,
a newer one refused)."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pg_support import database, postgres_server, postgres_url, target  # noqa: F401

from agentkit.services.conversations import ConversationNotFound, ConversationStore
from agentkit.services.feedback import FeedbackStore
from agentkit.services.storage import (
    Database,
    Migration,
    SchemaTooNew,
    migrate,
    open_database,
    schema_version,
    statements,
)

# ruff: noqa: F811  (the fixtures imported from pg_support are redefined as arguments)


def test_feedback_contract(database: Database) -> None:
    store = FeedbackStore(database)
    first = store.add_ranking("p", ["a", "b", "c"], "ann", ties=[["b", "c"]], owner="alice")
    second = store.add_rating("r", "good", 1, "bob", owner="bob")
    store.add_rating("r", "bad", -1, "bob", owner="bob")
    assert second > first
    assert store.count() == 3 and store.count("alice") == 1
    pairs = {(p["prompt"], p["chosen"], p["rejected"]) for p in store.pairwise()}
    assert pairs == {("p", "a", "b"), ("p", "a", "c"), ("r", "good", "bad")}
    assert store.pairwise("alice") == [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                       {"prompt": "p", "chosen": "a", "rejected": "c"}]  # fmt: skip
    with pytest.raises(database.IntegrityError):
        store.add_rating("p", "c", 1, None)  # type: ignore[arg-type]  # labeler NOT NULL
    assert store.add_rating("p", "c", 1, "ann") > second  # the writer is still usable
    store.close()  # the database was handed in: it stays open
    assert FeedbackStore(database).count() == 4


def test_concurrent_feedback_writers_lose_nothing_and_a_bad_row_fails_alone(
    database: Database,
) -> None:
    store = FeedbackStore(database)
    barrier = threading.Barrier(32)

    def write(i: int) -> str:
        barrier.wait()
        try:
            store.add_rating(f"p{i}", "c", 1, None if i % 8 == 0 else "ann", owner=f"k{i % 2}")  # type: ignore[arg-type]
        except database.IntegrityError:
            return "refused"
        return "stored"

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(write, range(320)))
    assert outcomes == ["refused" if i % 8 == 0 else "stored" for i in range(320)]
    assert store.count() == 280 and store.count("k1") == 160


def test_conversation_contract(database: Database) -> None:
    store = ConversationStore(database, max_messages=2, keep_messages=3)
    store.append("c1", [{"role": "user", "content": "hi"}], owner="alice")
    store.append("c1", [{"role": "assistant", "content": "hello"}], owner="alice")
    turn = [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]
    store.append("c1", turn, owner="alice")  # type: ignore[arg-type]
    assert [m["content"] for m in store.history("c1", owner="alice")] == ["more", "ok"]
    assert store.owner_of("c1") == "alice"
    with pytest.raises(ConversationNotFound):
        store.history("c1", owner="bob")
    with pytest.raises(ConversationNotFound):
        store.append("c1", [{"role": "user", "content": "mine?"}], owner="bob")
    store.append("open", [{"role": "user", "content": "no key"}])
    [summary] = store.summaries("alice")
    assert summary["id"] == "c1" and summary["messages"] == 3 and summary["title"] == "more"
    assert [s["id"] for s in store.summaries(None)] == ["open"]
    with pytest.raises(ConversationNotFound):
        store.delete("c1", "bob")
    store.delete("c1", "alice")
    assert store.history("c1") == [] and store.owner_of("c1") is None


def test_racing_first_writers_of_a_conversation_get_one_owner(database: Database) -> None:
    store = ConversationStore(database)
    barrier = threading.Barrier(8)

    def claim(i: int) -> bool:
        barrier.wait()
        try:
            store.append("shared", [{"role": "user", "content": f"{i}"}], owner=f"k{i}")
        except ConversationNotFound:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(claim, range(8))) == 1
    assert len(store.history("shared")) == 1


STEPS = [
    Migration(1, "a table", statements("CREATE TABLE IF NOT EXISTS things (id {id}, x {real})")),
    Migration(2, "an index", statements("CREATE INDEX IF NOT EXISTS things_x ON things(x)")),
]


def test_migrations_upgrade_an_old_database_and_record_the_version(database: Database) -> None:
    assert migrate(database, "things", STEPS[:1]) == 1
    with database.transaction() as db:
        db.execute("INSERT INTO things (x) VALUES (?)", (1.5,))
    assert migrate(database, "things", STEPS) == 2
    assert schema_version(database, "things") == 2
    assert migrate(database, "things", STEPS) == 2  # up to date: nothing runs
    with database.read() as db:
        assert db.execute("SELECT x FROM things").fetchall() == [(1.5,)]


def test_a_newer_database_is_refused_with_what_to_do(database: Database) -> None:
    migrate(database, "things", STEPS)
    with pytest.raises(SchemaTooNew, match="things schema version 2, newer than this agentkit "
                       r"knows \(1\): upgrade agentkit"):  # fmt: skip
        migrate(database, "things", STEPS[:1])
    FeedbackStore(database)
    with database.transaction() as db:
        db.execute("UPDATE agentkit_schema SET version = 99 WHERE component = 'feedback'")
    with pytest.raises(SchemaTooNew, match="feedback schema version 99"):
        FeedbackStore(database)


def test_workers_opening_a_new_database_together_migrate_it_once(target: str) -> None:
    barrier = threading.Barrier(6)

    def open_store(_: int) -> int:
        barrier.wait()
        with open_database(target) as db:
            store = FeedbackStore(db)
            return store.add_rating("p", "c", 1, "ann")

    with ThreadPoolExecutor(6) as pool:
        assert len(set(pool.map(open_store, range(6)))) == 6


OLD_FEEDBACK = """
CREATE TABLE feedback (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('rating', 'ranking')),
    prompt TEXT NOT NULL, completion TEXT, rating INTEGER, ranking TEXT, ties TEXT,
    comment TEXT, labeler TEXT NOT NULL, created REAL NOT NULL);
INSERT INTO feedback (kind, prompt, ranking, ties, labeler, created)
    VALUES ('ranking', 'old', '["a", "b"]', '[]', 'ann', 0);
CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id TEXT NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL);
INSERT INTO messages (conversation_id, role, content, created) VALUES ('c', 'user', 'hi', 0);
"""


def test_a_sqlite_file_from_before_versions_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as old:
        old.executescript(OLD_FEEDBACK)
    feedback, conversations = FeedbackStore(path), ConversationStore(path)
    assert feedback.pairwise() == [{"prompt": "old", "chosen": "a", "rejected": "b"}]
    assert feedback.count("alice") == 0  # the owner column is there; the old row has none
    assert conversations.owner_of("c") is None and len(conversations.history("c")) == 1
    assert schema_version(feedback.database, "feedback") == 3
    assert schema_version(feedback.database, "conversations") == 3


def test_labeling_contract(database: Database) -> None:
    from agentkit.services.labeling import LabelingStore, RankingConflict

    feedback = FeedbackStore(database)
    store = LabelingStore(feedback)
    task = store.create_task(["p1", "p2"], agent="agentkit-rag", n=3, labelers_per_prompt=2,
                             owner="alice")  # fmt: skip
    assert (task["prompts"], task["pending"]) == (2, 2)
    for item_id, prompt in store.pending(task["id"]):
        store.set_completions(item_id, [f"{prompt}-a", f"{prompt}-b", f"{prompt}-c"])
    served = store.next_item(task["id"], "ann")["item"]
    ranked = store.add_ranking(served["id"], [0, 1, 2], labeler="ann", ties=[[1, 2]], owner="alice")
    store.add_ranking(served["id"], [2, 1, 0], labeler="bob", owner="bob")
    with pytest.raises(RankingConflict):
        store.add_ranking(served["id"], [0, 1, 2], labeler="cy", owner="cy")
    assert store.task(task["id"])["rankings"] == 2
    assert store.agreement(task["id"])["prompts_compared"] == 1
    rating = store.add_feedback(prompt="q", labeler="ann", agent="agentkit-pal", completion="x",
                                rating=1, owner="alice")  # fmt: skip
    store.update_feedback(rating, owner="alice", rating=-1, comment="on second thought")
    with pytest.raises(Exception, match="no rating"):
        store.update_feedback(rating, owner="bob", rating=1)
    mine = store.export(owner="alice", task_id=task["id"])
    assert [(p["chosen"], p["rejected"]) for p in mine] == [("p1-a", "p1-b"), ("p1-a", "p1-c")]
    assert len(store.export()) == 2 + 3  # bob's ranking: three pairs; the rating has no pair
    assert store.export_options("alice") == {"labelers": ["ann"], "agents": ["agentkit-pal",
                                             "agentkit-rag"]}  # fmt: skip
    assert feedback.count() == 3 and ranked["feedback_id"] >= 1
