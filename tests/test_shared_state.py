"""What workers and replicas share besides conversations and feedback: jobs, rate-limit counts,
upload owners; on SQLite and on PostgreSQL, seen from two stores as from two workers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from pg_support import database, postgres_server, postgres_url, target  # noqa: F401

from agentkit.services.shared_state import JobStore, SharedRateLimiter, UploadOwnerStore
from agentkit.services.storage import Database

# ruff: noqa: F811  (the fixtures imported from pg_support are redefined as arguments)


def test_a_job_started_by_one_worker_is_seen_by_another(database: Database, target: str) -> None:
    first, second = JobStore(database), JobStore(target)
    record = first.create("j1", "folder", "alice")
    assert record["state"] == "running" and second.get("j1") == record
    first.finish("j1", summary={"added": 2})
    assert second.get("j1") == {**record, "state": "done", "summary": {"added": 2}}
    first.create("j2", "upload", None)
    first.finish("j2", error="no such folder")
    assert second.get("j2")["state"] == "failed" and second.get("j2")["error"] == "no such folder"
    assert second.get("nope") is None
    second.close()


def test_rate_limits_hold_across_workers(database: Database, target: str) -> None:
    now = [1000.0]
    workers = [SharedRateLimiter(database, 10, clock=lambda: now[0]),
               SharedRateLimiter(target, 10, clock=lambda: now[0])]  # fmt: skip
    barrier = threading.Barrier(16)

    def ask(i: int) -> bool:
        barrier.wait()
        return workers[i % 2].allow("alice")

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(ask, range(32))) == 10
    assert workers[0].allow("bob")  # another key counts apart
    now[0] += 59.9
    assert not workers[1].allow("alice")
    now[0] += 0.2  # a minute after the first ten
    assert workers[1].allow("alice")
    assert SharedRateLimiter(database, 0).allow("alice")  # 0: no limit
    workers[1].close()


def test_upload_owners_are_shared(database: Database, target: str) -> None:
    first, second = UploadOwnerStore(database), UploadOwnerStore(target)
    first.set("a.md", "alice")
    assert second.owner_of("a.md") == "alice" and second.owner_of("b.md") is None
    second.set("a.md", "bob")
    assert first.owner_of("a.md") == "bob"
    first.set("a.md", None)
    assert second.owner_of("a.md") is None
    second.close()


def test_a_job_runner_on_the_database_reports_to_every_worker(
    database: Database, target: str
) -> None:
    from agentkit.services.jobs import JobRunner

    class Summary:
        def to_dict(self) -> dict:
            return {"index": "/srv/index", "warnings": ["/srv/docs/a: skipped"], "added": 1}

    release = threading.Event()
    runner = JobRunner(report=lambda t: t.replace("/srv/docs/", ""), store=JobStore(database))
    elsewhere = JobRunner(store=JobStore(target))  # another worker's runner
    reported = threading.Event()

    def work(progress) -> Summary:
        progress(2, 5, 40)  # the first report is written at once (then at most every 0.5 s)
        reported.set()
        release.wait(10)
        return Summary()

    started = runner.start("folder", "alice", work)
    assert reported.wait(10)
    seen = elsewhere.get(started["id"])
    assert seen["state"] == "running"
    assert seen["progress"] == {"files_done": 2, "files_total": 5, "chunks": 40}
    release.set()
    for thread in runner.running():
        thread.join(10)
    done = elsewhere.get(started["id"])
    assert done["state"] == "done" and done["summary"]["index"] == "index"
    assert done["summary"]["warnings"] == ["a: skipped"]
