"""``agentkit serve --workers 2``: two worker processes on one port, sharing the database (SQLite
files, or a PostgreSQL server the tests start). Every request opens a new connection, so the
workers take turns; the jobs table records which worker started each job, which shows that both
answered. Keys added in the database, their records kept apart across workers, job status seen
from any worker, one rate limit for all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fake_server import completion_body, fake_server, sse_body
from fakes import HashingEmbedder
from pg_support import free_port, postgres_server, postgres_url  # noqa: F401

from agentkit.retrievers import Index
from agentkit.services.keys import KeyStore
from agentkit.services.storage import open_database
from agentkit.settings import Settings

# ruff: noqa: F811  (the fixtures imported from pg_support are redefined as arguments)

RATE_LIMIT = 60
SERVE = "from agentkit.cli import app; app()"


def answer(path: str, body: dict | None, number: int) -> tuple[int, dict[str, str], bytes]:
    if path.endswith("/models"):
        models = {"data": [{"id": "fake", "max_model_len": 2048}]}
        return 200, {"Content-Type": "application/json"}, json.dumps(models).encode()
    if path.endswith("/tokenize"):  # conversation history is trimmed to the model's budget
        return 200, {"Content-Type": "application/json"}, b'{"count": 10}'
    if body and body.get("stream"):
        return 200, {"Content-Type": "text/event-stream"}, sse_body(["Hello", " there"])
    return 200, {"Content-Type": "application/json"}, completion_body("Hello there")


@pytest.fixture(params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple]:
    """``agentkit serve --workers 2`` on the database of the parameter: (its URL, the keys by
    name, the database's location, the document folder)."""
    environment = {
        **os.environ,
        "AGENTKIT_INDEX": str(tmp_path / "index"),
        "AGENTKIT_API_DOCUMENT_ROOTS": str(tmp_path / "docs"),
        "AGENTKIT_API_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT),
        "AGENTKIT_API_SHUTDOWN_GRACE_S": "1",
        "AGENTKIT_FEEDBACK_DB": str(tmp_path / "feedback.sqlite"),
        "AGENTKIT_CONVERSATIONS_DB": str(tmp_path / "conversations.sqlite"),
        "AGENTKIT_STATE_DB": str(tmp_path / "state.sqlite"),
    }
    environment.pop("AGENTKIT_API_KEYS", None)
    location = str(tmp_path / "state.sqlite")
    if request.param == "postgresql":
        location = environment["AGENTKIT_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG not indexed")
    Index.create(tmp_path / "index", settings=Settings(), embedder=HashingEmbedder()).close()
    with open_database(location) as database:
        store = KeyStore(database)
        roles = {"alice": "user", "bob": "user", "carol": "user", "root": "admin"}
        keys = {name: store.add(name, role) for name, role in roles.items()}
    port = free_port()
    with fake_server(answer) as (model_url, _):
        environment["AGENTKIT_LLM_URL"] = model_url
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, "serve", "--workers", "2", "--port", str(port)],
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        log: list[str] = []
        try:
            assert process.stderr is not None
            started = 0
            for line in process.stderr:  # both workers say so before they take requests
                log.append(line)
                started += "Application startup complete" in line
                if started == 2:
                    break
            assert started == 2, "".join(log)
            threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()  # type: ignore[arg-type]
            yield f"http://127.0.0.1:{port}", keys, location, tmp_path / "docs"
        finally:
            process.terminate()
            process.wait(30)
            print("".join(log))  # the servers' log, shown when the test fails


def call(method: str, url: str, key: str, **kwargs) -> httpx.Response:
    """One request on a connection of its own (the workers take turns)."""
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.request(method, url, headers=headers, timeout=30, **kwargs)


def test_workers_share_keys_records_jobs_and_one_rate_limit(served) -> None:
    url, keys, location, docs = served
    alice, bob, carol, root = keys["alice"], keys["bob"], keys["carol"], keys["root"]
    assert call("GET", f"{url}/v1/models", "wrong").status_code == 401

    # conversations and feedback: each key's own, whichever worker answers
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
            "conversation_id": "c-alice", "max_tokens": 8}  # fmt: skip
    assert call("POST", f"{url}/v1/chat/completions", alice, json=chat).status_code == 200
    streamed = call("POST", f"{url}/v1/chat/completions", alice, json={**chat, "stream": True})
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    for _ in range(3):
        assert call("GET", f"{url}/v1/conversations/c-alice", bob).status_code == 404
        assert call("POST", f"{url}/v1/chat/completions", bob, json=chat).status_code == 404
    kept = call("GET", f"{url}/v1/conversations/c-alice", alice).json()
    assert [m["content"] for m in kept["messages"]] == ["hi", "Hello there", "hi", "Hello there"]
    ranking = {"prompt": "p", "ranking": ["a", "b"], "labeler": "alice"}
    for _ in range(4):
        assert call("POST", f"{url}/v1/feedback", alice, json=ranking).status_code == 200
    assert call("GET", f"{url}/v1/feedback/export", bob).text == ""
    assert len(call("GET", f"{url}/v1/feedback/export", alice).text.splitlines()) == 4
    assert len(call("GET", f"{url}/v1/feedback/export", root).text.splitlines()) == 4

    # jobs: started on one worker, followed from any (new ones until both workers started some)
    jobs: list[str] = []
    workers: set[str] = set()
    while len(workers) < 2 and len(jobs) < 16:
        started = call("POST", f"{url}/v1/documents/folder", root, json={"folder": str(docs)})
        assert started.status_code == 202, started.text
        jobs.append(started.json()["id"])
        with open_database(location) as database, database.read() as db:
            workers = {w for (w,) in db.execute("SELECT DISTINCT worker FROM jobs")}
    assert len(workers) == 2, "one worker answered every request"
    for job in jobs:
        seen = call("GET", f"{url}/v1/documents/jobs/{job}", root)
        assert seen.status_code == 200 and seen.json()["id"] == job
        assert call("GET", f"{url}/v1/documents/jobs/{job}", alice).status_code == 404

    # one rate limit across the workers: carol's burst, each request on a connection of its own
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: call("GET", f"{url}/v1/models", carol).status_code,
                                 range(RATE_LIMIT + 10)))  # fmt: skip
    assert statuses.count(200) == RATE_LIMIT and statuses.count(429) == 10
