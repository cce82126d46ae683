"""FeedbackStore: owners kept apart, old databases migrated, exports whole under concurrent
writes, writers queued in process on one connection."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agentkit.services import feedback, storage
from agentkit.services.feedback import FeedbackStore

OLD_SCHEMA = """
CREATE TABLE feedback (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('rating', 'ranking')),
    prompt TEXT NOT NULL, completion TEXT, rating INTEGER, ranking TEXT, ties TEXT,
    comment TEXT, labeler TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX feedback_by_prompt ON feedback(prompt);
INSERT INTO feedback (kind, prompt, ranking, ties, labeler, created)
    VALUES ('ranking', 'old', '["a", "b"]', '[]', 'ann', 0);
"""


def pairs_of(export: list[dict[str, str]]) -> set[tuple[str, str, str]]:
    return {(p["prompt"], p["chosen"], p["rejected"]) for p in export}


def test_each_owner_exports_only_their_own_records_and_admins_everything(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "f.sqlite")
    store.add_ranking("p", ["a", "b"], "ann", owner="alice")
    store.add_ranking("q", ["x", "y"], "bob", owner="bob")
    store.add_rating("r", "good", 1, "ann", owner="alice")
    store.add_rating("r", "bad", -1, "bob", owner="bob")  # pairs only when both are exported
    store.add_rating("r", "worse", -1, "ann", owner="alice")

    assert pairs_of(store.pairwise("alice")) == {("p", "a", "b"), ("r", "good", "worse")}
    assert pairs_of(store.pairwise("bob")) == {("q", "x", "y")}
    assert pairs_of(store.pairwise()) == {
        ("p", "a", "b"),
        ("q", "x", "y"),
        ("r", "good", "bad"),
        ("r", "good", "worse"),
    }
    assert store.pairwise("nobody") == []
    assert (store.count(), store.count("alice"), store.count("bob")) == (5, 3, 2)
    owners = sqlite3.connect(tmp_path / "f.sqlite").execute(
        "SELECT owner FROM feedback ORDER BY id"
    )
    assert [o for (o,) in owners] == ["alice", "bob", "alice", "bob", "alice"]


def test_a_database_from_before_owners_gains_the_column_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    store = FeedbackStore(path)
    store.add_ranking("new", ["c", "d"], "bob", owner="bob")
    assert pairs_of(store.pairwise()) == {("old", "a", "b"), ("new", "c", "d")}
    assert pairs_of(store.pairwise("bob")) == {("new", "c", "d")}
    rows = sqlite3.connect(path).execute("SELECT prompt, owner FROM feedback ORDER BY id")
    assert rows.fetchall() == [("old", None), ("new", "bob")]
    store.close()
    again = FeedbackStore(path)  # opening a migrated database changes nothing
    assert again.count() == 2


def test_the_export_is_a_list_that_other_threads_can_consume(tmp_path: Path) -> None:
    """A streaming response pulls the export on whichever worker thread is free."""
    store = FeedbackStore(tmp_path / "f.sqlite")
    for i in range(50):
        store.add_ranking(f"p{i}", ["a", "b", "c"], "ann")
    export = store.pairwise()
    assert isinstance(export, list)
    items = iter(export)
    with ThreadPoolExecutor(4) as pool:
        pulled = [pool.submit(lambda: [next(items) for _ in range(10)]) for _ in range(15)]
        consumed = [pair for chunk in pulled for pair in chunk.result()]
    assert len(consumed) == 150 and pairs_of(consumed) == pairs_of(export)


def test_exports_under_16_concurrent_writers_are_whole_snapshots(tmp_path: Path) -> None:
    """Each writer adds a ranking (1 pair), then two ratings of a new prompt (1 more pair).

    A snapshot therefore never holds more rating pairs than ranking pairs for one writer, a later
    export never has fewer pairs than an earlier one, and the export after the writers stop has
    every pair.
    """
    store = FeedbackStore(tmp_path / "f.sqlite")
    writers, rounds = 16, 20
    done = threading.Event()

    def write(w: int) -> None:
        for i in range(rounds):
            store.add_ranking(f"w{w}", [f"a{i}", f"b{i}"], "ann")
            store.add_rating(f"r{w}-{i}", "good", 1, "ann")
            store.add_rating(f"r{w}-{i}", "bad", -1, "ann")

    def export_until_done() -> list[int]:
        sizes = []
        while not done.is_set():
            export = store.pairwise()
            ranked: dict[str, int] = {}
            rated: dict[str, int] = {}
            for pair in export:
                if pair["prompt"].startswith("w"):
                    ranked[pair["prompt"][1:]] = ranked.get(pair["prompt"][1:], 0) + 1
                else:
                    w = pair["prompt"][1:].split("-")[0]
                    rated[w] = rated.get(w, 0) + 1
            assert all(n <= ranked.get(w, 0) for w, n in rated.items()), (ranked, rated)
            sizes.append(len(export))
        return sizes

    with ThreadPoolExecutor(writers + 3) as pool:
        exporters = [pool.submit(export_until_done) for _ in range(2)]
        list(pool.map(write, range(writers)))
        done.set()
        sizes = [e.result() for e in exporters]
    for seen in sizes:
        assert seen and seen == sorted(seen)  # never shrinks (and never raised)
    assert len(store.pairwise()) == writers * rounds * 2
    assert store.count() == writers * rounds * 3


def test_writers_in_one_process_share_one_connection_and_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 threads write through the store's one writer connection: no connection per thread,
    so they queue on a lock instead of sleeping in SQLite's busy handler."""
    store = FeedbackStore(tmp_path / "f.sqlite")
    opened = []
    connect = sqlite3.connect

    def counting_connect(*args, **kwargs):
        opened.append(threading.get_ident())
        return connect(*args, **kwargs)

    monkeypatch.setattr(storage.sqlite3, "connect", counting_connect)
    with ThreadPoolExecutor(64) as pool:
        ids = list(pool.map(lambda i: store.add_rating(f"p{i % 7}", f"c{i}", 1, "x"), range(640)))
    assert opened == []
    assert sorted(ids) == list(range(1, 641))
    assert store.count() == 640


def test_two_stores_on_one_file_write_side_by_side_without_loss(tmp_path: Path) -> None:
    """Like two API processes: their writer connections meet in SQLite's busy timeout."""
    first, second = FeedbackStore(tmp_path / "f.sqlite"), FeedbackStore(tmp_path / "f.sqlite")

    def write(i: int) -> int:
        return (first if i % 2 else second).add_ranking(f"p{i}", ["a", "b"], "x", owner=f"k{i % 3}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(400)))
    assert first.count() == second.count() == 400
    assert len(second.pairwise()) == 400
    assert sum(len(first.pairwise(f"k{k}")) for k in range(3)) == 400


def test_a_failed_write_leaves_the_writer_usable(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "f.sqlite")
    with pytest.raises(sqlite3.IntegrityError):
        store.add_rating("p", "c", 1, None)  # type: ignore[arg-type]  # labeler NOT NULL
    assert store.add_rating("p", "c", 1, "ann") == 1
    with pytest.raises(ValueError, match="rating must be"):
        store.add_rating("p", "c", 2, "ann")
    assert store.count() == 1


def test_a_bad_row_fails_alone_among_concurrent_writes(tmp_path: Path) -> None:
    """Writers that queue together commit together; a row SQLite refuses fails on its own."""
    store = FeedbackStore(tmp_path / "f.sqlite")
    barrier = threading.Barrier(32)

    def write(i: int) -> str:
        barrier.wait()
        try:
            store.add_rating(f"p{i}", "c", 1, None if i % 4 == 0 else "ann")  # type: ignore[arg-type]
        except sqlite3.IntegrityError:
            return "refused"
        return "stored"

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(write, range(32)))
    assert outcomes == ["refused" if i % 4 == 0 else "stored" for i in range(32)]
    stored = sqlite3.connect(tmp_path / "f.sqlite").execute("SELECT prompt FROM feedback")
    assert sorted(p for (p,) in stored) == sorted(f"p{i}" for i in range(32) if i % 4)


WRITER_PROCESS = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("feedback_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
print("ready", flush=True)
sys.stdin.readline()
store = module.FeedbackStore(sys.argv[2])
for i in range(100):
    store.add_rating(f"p{i}", f"c{i}", 1, "x", owner=sys.argv[3])
"""


def test_processes_opening_a_new_database_at_once_all_write(tmp_path: Path) -> None:
    """Switching a new file to WAL does not wait for other connections; openers retry."""
    path = tmp_path / "f.sqlite"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER_PROCESS, feedback.__file__, str(path), f"p{k}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(4)
    ]
    for worker in workers:
        assert worker.stdout and worker.stdout.readline() == "ready\n"
    for worker in workers:
        assert worker.stdin
        worker.stdin.write("go\n")
        worker.stdin.flush()
    for worker in workers:
        _, errors = worker.communicate(timeout=120)
        assert worker.returncode == 0, errors
    store = FeedbackStore(path)
    assert [store.count(f"p{k}") for k in range(4)] == [100] * 4
