"""The API's background index jobs: records by id, done or failed, paths as the API shows them."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from agentkit.services.jobs import JobRunner


@dataclass
class Summary:
    index: str = "/srv/indexes/main"
    warnings: list[str] = field(default_factory=lambda: ["skipped /srv/docs/p.md: a FIFO"])

    def to_dict(self) -> dict:
        return {"index": self.index, "warnings": list(self.warnings), "added": 1}


def finished(runner: JobRunner, job_id: str) -> dict:
    for thread in runner.running():
        thread.join(10)
    record = runner.get(job_id)
    assert record is not None
    return record


def test_a_job_runs_in_the_background_and_reports_its_summary() -> None:
    release = threading.Event()

    reported = threading.Event()

    def work(progress) -> Summary:
        progress(1, 3, 10)
        reported.set()
        release.wait(10)
        return Summary()

    runner = JobRunner(report=lambda text: text.replace("/srv/docs/", ""))
    started = runner.start("folder", "alice", work)
    assert started["state"] == "running" and started["owner"] == "alice"
    assert reported.wait(10)
    running = runner.get(started["id"])
    assert running["state"] == "running"  # the work waits for us
    assert running["progress"] == {"files_done": 1, "files_total": 3, "chunks": 10}
    release.set()
    done = finished(runner, started["id"])
    assert done["state"] == "done" and done["summary"]["added"] == 1
    assert done["summary"]["index"] == "main"  # the folder's name, not its path
    assert done["summary"]["warnings"] == ["skipped p.md: a FIFO"]


def test_a_failed_job_says_why_and_the_runner_goes_on() -> None:
    def broken(progress) -> Summary:
        raise OSError("cannot read /srv/docs/secret")

    runner = JobRunner(report=lambda text: text.replace("/srv/docs/", ""))
    failed = finished(runner, runner.start("upload", None, broken)["id"])
    assert failed["state"] == "failed" and failed["error"] == "cannot read secret"
    fine = runner.start("upload", None, lambda _: Summary())
    assert finished(runner, fine["id"])["state"] == "done"


def test_records_are_copies_and_unknown_ids_are_none() -> None:
    runner = JobRunner()
    job = finished(runner, runner.start("folder", "bob", lambda _: Summary())["id"])
    job["state"] = "tampered"
    assert runner.get(job["id"])["state"] == "done"
    assert runner.get("nope") is None
