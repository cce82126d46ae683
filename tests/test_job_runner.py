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

    def work() -> Summary:
        release.wait(10)
        return Summary()

    runner = JobRunner(report=lambda text: text.replace("/srv/docs/", ""))
    started = runner.start("folder", "alice", work)
    assert started["state"] == "running" and started["owner"] == "alice"
    assert runner.get(started["id"])["state"] == "running"  # the work waits for us
    release.set()
    done = finished(runner, started["id"])
    assert done["state"] == "done" and done["summary"]["added"] == 1
    assert done["summary"]["index"] == "main"  # the folder's name, not its path
    assert done["summary"]["warnings"] == ["skipped p.md: a FIFO"]


def test_a_failed_job_says_why_and_the_runner_goes_on() -> None:
    def broken() -> Summary:
        raise OSError("cannot read /srv/docs/secret")

    runner = JobRunner(report=lambda text: text.replace("/srv/docs/", ""))
    failed = finished(runner, runner.start("upload", None, broken)["id"])
    assert failed["state"] == "failed" and failed["error"] == "cannot read secret"
    assert finished(runner, runner.start("upload", None, Summary)["id"])["state"] == "done"


def test_records_are_copies_and_unknown_ids_are_none() -> None:
    runner = JobRunner()
    job = finished(runner, runner.start("folder", "bob", Summary)["id"])
    job["state"] = "tampered"
    assert runner.get(job["id"])["state"] == "done"
    assert runner.get("nope") is None
