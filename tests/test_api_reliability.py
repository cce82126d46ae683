"""The REST API under faults (issue 18): a stream is refused before it starts for whatever the
same request gets a 4xx for unstreamed, an error after it starts is OpenAI's error event and
``[DONE]``, shutdown has a grace period and a second signal, a client that goes away stops its
PAL run, and the RAG settings reach the API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fake_server import MODELS, serving
from fakes import HashingEmbedder
from fastapi.testclient import TestClient

from agentkit import Index, index_folder
from agentkit.errors import LLMError
from agentkit.llm import Delta
from agentkit.services.api import ApiConfig, create_app
from agentkit.services.conversations import ConversationStore
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel
from agentkit.tools.sandbox import Sandbox

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
QUESTION = "Which module needs zlib?"


def ask(text: str = QUESTION, model: str = "agentkit-rag", **fields: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **fields}


class NamedModel(ScriptedChatModel):
    """A scripted model that says its name, as a model server does: other names are refused."""

    model = "served"


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture
def index(docs: Path, settings: Settings, embedder: HashingEmbedder) -> Iterator[Index]:
    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as opened:
        yield opened


# --- 1. a stream is refused as the same request unstreamed is -------------------------------


@pytest.fixture
def client(index: Index, tmp_path: Path) -> Iterator[TestClient]:
    """The API with two keys; alice has a conversation "alices"."""
    model = NamedModel(lambda messages, **kw: "The aardvark module needs zlib [1].")
    app = create_app(
        model,
        index,
        config=ApiConfig(api_keys=("alice:user:key-alice", "bob:user:key-bob")),
        conversations=ConversationStore(tmp_path / "conversations.sqlite"),
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        alices = ask(model="served", conversation_id="alices")
        assert test_client.post("/v1/chat/completions", json=alices, headers=ALICE).is_success
        yield test_client


REFUSED = {
    "a question longer than a query may be": (ask("zlib " * 2000), 400),
    "messages longer than the model's context": (ask("word " * 5000, model="served"), 400),
    "max_tokens beyond the model's context": (ask(model="served", max_tokens=5000), 400),
    "a model that is not served": (ask(model="gpt-4o"), 404),
    "no messages": ({"model": "agentkit-rag", "messages": []}, 400),
    "no user message for an agent": (
        {"model": "agentkit-pal", "messages": [{"role": "system", "content": "be brief"}]},
        400,
    ),
    "another key's conversation": (ask(model="served", conversation_id="alices"), 404),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_stream_is_refused_before_it_starts_with_the_unstreamed_status(
    client: TestClient, case: str
) -> None:
    body, status = REFUSED[case]
    plain = client.post("/v1/chat/completions", json=body, headers=BOB)
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=BOB)
    assert plain.status_code == streamed.status_code == status, (plain.text, streamed.text)
    assert streamed.headers["content-type"].startswith("application/json")
    assert streamed.json()["error"]["code"] == status
    assert streamed.json()["error"]["message"] == plain.json()["error"]["message"]


class FailingStream(NamedModel):
    """Streams one piece, then fails as a model server that dies mid-answer does."""

    def __init__(self, error: Exception) -> None:
        super().__init__(["unused"])
        self.error = error

    def stream(self, messages, **kwargs) -> Iterator[Delta]:  # type: ignore[override]
        yield Delta("partial")
        raise self.error


@pytest.mark.parametrize(
    ("error", "kind", "code"),
    [
        (LLMError("the model server closed the stream"), "LLMError", 502),
        (RuntimeError("a bug"), "server_error", 500),
    ],
)
def test_an_error_after_the_stream_started_is_an_error_event_then_done(
    error: Exception, kind: str, code: int
) -> None:
    with TestClient(create_app(FailingStream(error)), raise_server_exceptions=False) as client:
        response = client.post("/v1/chat/completions", json=ask(model="served", stream=True))
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    failure = json.loads(events[-2])["error"]
    assert failure["type"] == kind and failure["code"] == code and failure["message"]
    assert "a bug" not in response.text  # internal errors are not shown
    chunks = [json.loads(e) for e in events[:-2]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "partial"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)  # it did not finish


def test_the_openai_client_raises_on_an_error_event() -> None:
    from openai import APIError, OpenAI

    app = create_app(FailingStream(LLMError("the model server closed the stream")))
    with TestClient(app) as client:
        openai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
        pieces = openai.chat.completions.create(
            model="served", stream=True, messages=[{"role": "user", "content": "hi"}]
        )
        with pytest.raises(APIError, match="closed the stream"):
            list(pieces)


# --- 2. shutdown: a grace period, then a second signal exits at once -----------------------


@contextmanager
def slow_model_server() -> Iterator[tuple[str, threading.Event]]:
    """An OpenAI-compatible model server whose streams send one piece ("first") and then hold
    until the event is set: a long generation."""
    release = threading.Event()

    class Handle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(MODELS)))
            self.end_headers()
            self.wfile.write(MODELS)

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            piece = {"choices": [{"index": 0, "delta": {"content": "first"}}]}
            self.wfile.write(f"data: {json.dumps(piece)}\n\n".encode())
            self.wfile.flush()
            release.wait(120)
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", release
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@dataclass
class ApiProcess:
    process: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)
    said: dict[str, threading.Event] = field(default_factory=dict)

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        """Block until the server's log has a line containing ``text`` (registered first)."""
        assert self.said[text].wait(timeout), f"no {text!r} in the log:\n" + "".join(self.log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def agentkit_serve(tmp_path: Path, llm_url: str, grace_s: float) -> Iterator[ApiProcess]:
    """``agentkit serve`` in a process of its own, once uvicorn says it is running."""
    port = free_port()
    env = {
        **os.environ,
        "AGENTKIT_LLM_URL": llm_url,
        "AGENTKIT_LLM_MAX_RETRIES": "0",
        "AGENTKIT_API_SHUTDOWN_GRACE_S": str(grace_s),
        "AGENTKIT_CACHE_DIR": str(tmp_path / "cache"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "agentkit.cli", "serve", "--port", str(port)],
        cwd=tmp_path,  # no index there; the stores go to tmp_path/.agentkit
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    api = ApiProcess(process, f"http://127.0.0.1:{port}")
    for text in ("Uvicorn running on", "Shutting down", "Waiting for connections to close"):
        api.said[text] = threading.Event()

    def read_log() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            api.log.append(line)
            for text, seen in api.said.items():
                if text in line:
                    seen.set()

    threading.Thread(target=read_log, daemon=True).start()
    try:
        api.wait_for_log("Uvicorn running on")
        yield api
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def open_stream(api: ApiProcess, body: dict) -> tuple[Iterator[str], object]:
    """POST a streamed chat; returns its lines and the open response (to close)."""
    stream = httpx.stream("POST", api.url + "/v1/chat/completions", json=body, timeout=120)
    response = stream.__enter__()
    assert response.status_code == 200, response.read()
    return response.iter_lines(), stream


def read_until_first_piece(lines: Iterator[str]) -> None:
    for line in lines:
        if '"content":"first"' in line:
            return
    raise AssertionError("the stream ended before its first piece")


def rest_of(lines: Iterator[str]) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def test_sigterm_gives_open_streams_the_grace_period_then_ends_them_and_exits(
    tmp_path: Path,
) -> None:
    grace = 2.0
    with slow_model_server() as (llm_url, _), agentkit_serve(tmp_path, llm_url, grace) as api:
        body = ask(model="fake", stream=True, conversation_id="cut-short")
        lines, stream = open_stream(api, body)
        try:
            read_until_first_piece(lines)
            signalled = time.monotonic()
            api.process.send_signal(signal.SIGTERM)
            events = rest_of(lines)
            ended = time.monotonic() - signalled
        finally:
            stream.__exit__(None, None, None)  # type: ignore[attr-defined]
        assert events[-1] == "[DONE]"
        failure = json.loads(events[-2])["error"]
        assert failure["code"] == 503 and "shutting down" in failure["message"]
        assert grace - 0.5 <= ended <= grace + 3, ended  # the grace period, then no longer
        assert api.process.wait(timeout=15) == 0, "".join(api.log)
        exited = time.monotonic() - signalled
    assert exited <= grace + 10, exited
    # Nothing half-written: the cut-short turn is not in the conversation store.
    store = ConversationStore(tmp_path / ".agentkit" / "conversations.sqlite")
    try:
        assert store.history("cut-short") == []
    finally:
        store.close()


def test_a_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    grace = 60.0
    with slow_model_server() as (llm_url, _), agentkit_serve(tmp_path, llm_url, grace) as api:
        lines, stream = open_stream(api, ask(model="fake", stream=True))
        try:
            read_until_first_piece(lines)
            api.process.send_signal(signal.SIGTERM)
            api.wait_for_log("Shutting down")  # the first signal is being handled
            again = time.monotonic()
            api.process.send_signal(signal.SIGTERM)
            events = rest_of(lines)
            ended = time.monotonic() - again
        finally:
            stream.__exit__(None, None, None)  # type: ignore[attr-defined]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 503
        assert ended < 5, ended
        assert api.process.wait(timeout=10) == 1, "".join(api.log)
        assert time.monotonic() - again < 10


def test_a_second_sigterm_exits_within_a_second_even_when_a_request_hangs(
    tmp_path: Path,
) -> None:
    with slow_model_server() as (llm_url, _), agentkit_serve(tmp_path, llm_url, 60.0) as api:
        host, port = api.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
            assert client.recv(100).startswith(b"HTTP/1.1 200")  # the connection is served
            client.sendall(  # a body that never comes: uvicorn waits for this request
                b"POST /v1/feedback HTTP/1.1\r\nHost: api\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            api.process.send_signal(signal.SIGTERM)
            api.wait_for_log("Waiting for connections to close")
            again = time.monotonic()
            api.process.send_signal(signal.SIGTERM)
            assert api.process.wait(timeout=10) == 1, "".join(api.log)
        assert time.monotonic() - again < 3


# --- 3. a client that goes away stops its PAL run ------------------------------------------

LOOPING_PROGRAM = "def solution():\n    n = 0\n    while True:\n        n += 1\n"


class WatchedSandbox(Sandbox):
    """A sandbox that says when a run starts and keeps each result."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.started, self.finished = threading.Event(), threading.Event()
        self.results: list = []

    def run(self, code: str, **options: object):  # type: ignore[override]
        self.started.set()
        result = super().run(code, **options)  # type: ignore[arg-type]
        self.results.append(result)
        self.finished.set()
        return result


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_its_pal_run(stream: bool) -> None:
    timeout_s = 120.0
    sandbox = WatchedSandbox(timeout_s=timeout_s, workers=1)
    model = ScriptedChatModel(lambda messages, **kw: LOOPING_PROGRAM)
    try:
        with serving(create_app(model, sandbox=sandbox)) as url:
            address = url.removeprefix("http://")
            host, port = address.split(":")
            body = json.dumps(ask("Count for ever.", model="agentkit-pal", stream=stream))
            request = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
            client = socket.create_connection((host, int(port)))
            client.sendall(request)
            assert sandbox.started.wait(30), "the program never started"
            client.close()
            gone = time.monotonic()
            assert sandbox.finished.wait(timeout_s / 4), "the run went on after the client left"
            stopped_after = time.monotonic() - gone
        assert sandbox.results[0].error_type == "cancelled"
        assert sandbox.limit_hits == {"cancelled": 1}
        assert stopped_after < 10, stopped_after
    finally:
        sandbox.close()


# --- 5. the RAG settings reach the API ------------------------------------------------------


def sources_in(prompt: str) -> int:
    """How many numbered sources a RAG prompt holds."""
    return sum(1 for line in prompt.splitlines() if line[:1] == "[" and "] " in line[:6])


@pytest.mark.parametrize("stream", [False, True])
def test_the_rag_settings_reach_the_api(index: Index, settings: Settings, stream: bool) -> None:
    def answer(tuned: Settings, **fields: object) -> tuple[ScriptedChatModel, str]:
        model = ScriptedChatModel(lambda messages, **kw: "The aardvark module needs zlib [1].")
        with TestClient(create_app(model, index, settings=tuned)) as client:
            response = client.post(
                "/v1/chat/completions", json=ask("aardvark zlib module", stream=stream, **fields)
            )
        assert response.status_code == 200, response.text
        return model, response.text

    defaults, _ = answer(settings)
    assert sources_in(defaults.calls[-1].messages[-1]["content"]) > 1
    assert defaults.calls[-1].kwargs["max_tokens"] == 384

    one_source, _ = answer(settings.model_copy(update={"rag_k": 1}))
    assert sources_in(one_source.calls[-1].messages[-1]["content"]) == 1

    shorter, _ = answer(settings.model_copy(update={"rag_max_tokens": 77}))
    assert shorter.calls[-1].kwargs["max_tokens"] == 77
    asked, _ = answer(settings.model_copy(update={"rag_max_tokens": 77}), max_tokens=50)
    assert asked.calls[-1].kwargs["max_tokens"] == 50  # the request's own wins

    strict, text = answer(settings.model_copy(update={"rag_min_similarity": 0.999}))
    assert strict.calls == [] and "do not contain the answer" in text
