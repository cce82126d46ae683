"""The REST API with the scripted model: the openai client and LangChain unchanged, SSE framing,
feedback export, auth, limits, errors."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from fakes import HashingEmbedder

from agentkit import Index, index_folder
from agentkit.client import Client
from agentkit.services.api import ApiConfig, create_app
from agentkit.services.feedback import FeedbackStore
from agentkit.services.streaming import WORKER_NICENESS
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel


def reply(messages, **kw) -> str:
    last = messages[-1]["content"]
    if "Sources:" in last:
        return "The aardvark module needs zlib [1][9]."
    return "Echo: " + last


class Running:
    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


@pytest.fixture
def api(docs: Path, settings: Settings, embedder: HashingEmbedder, tmp_path: Path):
    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    index = Index.open(settings.index, settings=settings, embedder=embedder)
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    app = create_app(
        ScriptedChatModel(reply), index, feedback=store, config=ApiConfig(max_body_bytes=50_000)
    )
    running = Running(app)
    yield running, store
    running.stop()
    index.close()


def test_the_official_openai_client_works_unchanged(api) -> None:
    from openai import OpenAI

    running, _ = api
    client = OpenAI(base_url=running.url + "/v1", api_key="unused")
    done = client.chat.completions.create(
        model="agentkit-rag", messages=[{"role": "user", "content": "Which module needs zlib?"}]
    )
    assert done.choices[0].message.content == "The aardvark module needs zlib [1]."
    extra = done.model_extra["agentkit"]
    assert extra["citations"][0]["source"] == "guide/install.md" and extra["invalid_citations"] == [
        9
    ]
    pieces = client.chat.completions.create(
        model="agentkit-rag",
        stream=True,
        messages=[{"role": "user", "content": "Which module needs zlib?"}],
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in pieces).strip()
        == "The aardvark module needs zlib [1]."
    )
    plain = client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "hi"}]
    )
    assert plain.choices[0].message.content == "Echo: hi"
    assert {m.id for m in client.models.list()} >= {
        "agentkit-rag",
        "agentkit-pal",
        "agentkit-react",
    }


def test_langchain_chat_openai_works_unchanged(api) -> None:
    from langchain_openai import ChatOpenAI

    running, _ = api
    llm = ChatOpenAI(base_url=running.url + "/v1", api_key="unused", model="scripted")
    assert llm.invoke("hello").content == "Echo: hello"
    assert "".join(c.content for c in llm.stream("hello")) == "Echo: hello"


def test_sse_framing_is_openais(api) -> None:
    running, _ = api
    body = {"model": "scripted", "stream": True, "messages": [{"role": "user", "content": "a b"}]}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    first, last = chunks[0], chunks[-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Echo: a b"


def token_counter(url: str, kind: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'agentkit_tokens_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("model", ["scripted", "agentkit-rag"])
def test_streams_report_usage_when_asked_and_count_their_tokens(api, model: str) -> None:
    from openai import OpenAI

    running, _ = api
    client = OpenAI(base_url=running.url + "/v1", api_key="unused")
    before = token_counter(running.url, "completion")
    chunks = list(
        client.chat.completions.create(
            model=model,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Which module needs zlib?"}],
        )
    )
    last = chunks[-1]  # OpenAI's shape: no choices, only the usage
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    after = token_counter(running.url, "completion")
    assert after - before == last.usage.completion_tokens
    plain = client.chat.completions.create(
        model=model, stream=True, messages=[{"role": "user", "content": "hi"}]
    )
    assert all(c.usage is None and c.choices for c in plain)  # not asked: no usage chunk


def test_feedback_exports_pairwise_preferences(api) -> None:
    running, store = api
    with Client(running.url) as client:
        client.feedback(prompt="p", ranking=["a", "b", "c", "d"], labeler="ann")
        client.feedback(prompt="q", ranking=["x", "y", "z"], ties=[["y", "z"]], labeler="bob")
        client.feedback(prompt="r", completion="good", rating=1, labeler="ann")
        client.feedback(prompt="r", completion="bad", rating=-1, labeler="bob")
    lines = httpx.get(running.url + "/v1/feedback/export?format=pairwise").text.splitlines()
    pairs = [json.loads(line) for line in lines]
    by_prompt = {
        p: [(x["chosen"], x["rejected"]) for x in pairs if x["prompt"] == p] for p in "pqr"
    }
    assert (
        len(by_prompt["p"]) == 6
        and ("a", "d") in by_prompt["p"]
        and ("d", "a") not in by_prompt["p"]
    )
    assert sorted(by_prompt["q"]) == [("x", "y"), ("x", "z")]
    assert by_prompt["r"] == [("good", "bad")]


def test_concurrent_feedback_writes_are_never_lost(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "f.sqlite")

    def write(i: int) -> None:
        FeedbackStore(tmp_path / "f.sqlite").add_rating(f"p{i % 5}", f"c{i}", 1, "x")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(400)))
    assert store.count() == 400


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("not json", 400),
        ({"model": "agentkit-rag"}, 400),
        ({"model": "agentkit-rag", "messages": []}, 400),
        ({"model": "x", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400),
        ({"model": "agentkit-rag", "messages": [{"role": "system", "content": "only"}]}, 400),
    ],
)
def test_malformed_requests_are_4xx_in_openais_error_shape(api, body, status) -> None:
    running, _ = api
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    response = httpx.post(running.url + "/v1/chat/completions", **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert "Traceback" not in response.text


def test_oversized_requests_get_413(api) -> None:
    running, _ = api
    big = {"model": "x", "messages": [{"role": "user", "content": "x" * 60_000}]}
    assert httpx.post(running.url + "/v1/chat/completions", json=big).status_code == 413


def test_api_keys_and_rate_limits(tmp_path: Path) -> None:
    app = create_app(
        ScriptedChatModel(reply),
        None,
        config=ApiConfig(api_keys=("secret-key",), rate_limit_per_minute=2),
    )
    running = Running(app)
    try:
        url = running.url + "/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = {"Authorization": "Bearer secret-key"}
        assert [httpx.get(url, headers=good).status_code for _ in range(3)] == [200, 200, 429]
        assert httpx.get(running.url + "/healthz").status_code == 200
    finally:
        running.stop()


def test_health_readiness_search_and_metrics(api) -> None:
    running, _ = api
    assert httpx.get(running.url + "/readyz").json() == {
        "ready": True,
        "index": True,
        "model": True,
    }
    hits = httpx.post(running.url + "/v1/search", json={"query": "aardvark zlib", "k": 2}).json()
    assert hits["data"][0]["source"] == "guide/install.md"
    metrics = httpx.get(running.url + "/metrics").text
    assert 'agentkit_requests_total{path="/v1/search",status="200"} 1.0' in metrics
    assert "agentkit_request_seconds_bucket" in metrics


def test_the_sdk_client_streams_text_and_agent_events(api) -> None:
    running, _ = api
    with Client(running.url) as client:
        reply_ = client.chat("Which module needs zlib?")
        assert reply_.text.endswith("[1].") and reply_.citations[0]["number"] == 1
        items = list(client.chat_stream("Which module needs zlib?"))
    text = "".join(i for i in items if isinstance(i, str))
    events = [i for i in items if isinstance(i, dict)]
    assert (
        text.strip() == reply_.text and events[-1]["citations"][0]["source"] == "guide/install.md"
    )


def test_documents_are_uploaded_indexed_in_the_background_and_deleted(
    settings: Settings, embedder: HashingEmbedder, tmp_path: Path, docs: Path
) -> None:
    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    index = Index.open(settings.index, settings=settings, embedder=embedder)
    config = ApiConfig(document_roots=(str(docs),), upload_dir=str(tmp_path / "uploads"))
    running = Running(create_app(ScriptedChatModel(reply), index, config=config))
    try:
        kestrel = b"# Kestrel\n\nThe kestrel flag enables turbo mode.\n"
        traversal = {"files": ("../../evil/kestrel.md", kestrel)}
        refused = httpx.post(running.url + "/v1/documents", files=traversal)
        assert refused.status_code == 400 and "path separator" in refused.json()["error"]["message"]
        job = httpx.post(running.url + "/v1/documents", files={"files": ("kestrel.md", kestrel)})
        job = job.json()
        for _ in range(200):
            status = httpx.get(f"{running.url}/v1/documents/jobs/{job['id']}").json()
            if status["state"] != "running":
                break
            time.sleep(0.05)
        assert status["state"] == "done" and status["summary"]["added"] == 1, status
        assert (tmp_path / "uploads" / "kestrel.md").exists()
        assert not (tmp_path / "evil").exists()
        hits = httpx.post(running.url + "/v1/search", json={"query": "kestrel turbo"}).json()
        assert hits["data"][0]["source"] == "kestrel.md"
        outside = httpx.post(running.url + "/v1/documents/folder", json={"folder": "/etc"})
        sneaky = httpx.post(
            running.url + "/v1/documents/folder", json={"folder": f"{docs}/../../.."}
        )
        assert outside.status_code == sneaky.status_code == 403
        inside = httpx.post(running.url + "/v1/documents/folder", json={"folder": str(docs)})
        assert inside.status_code == 202
        assert httpx.delete(running.url + "/v1/documents/kestrel.md").json()["documents"] == 1
        assert httpx.delete(running.url + "/v1/documents/kestrel.md").status_code == 404
    finally:
        running.stop()
        index.close()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are Linux's")
def test_agents_run_below_the_event_loops_priority() -> None:
    """Under load, the agents' CPU work must leave the cores to the event loop (/healthz)."""

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: list[int] = []
    loop_priority: list[int] = []

    def reply(messages: list, **kw: object) -> str:
        seen.append(priority())
        return "ok"

    app = create_app(ScriptedChatModel(reply), None)

    @app.middleware("http")
    async def record(request, call_next):  # type: ignore[no-untyped-def]
        loop_priority.append(priority())
        return await call_next(request)

    running = Running(app)
    try:
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
        for stream in (False, True):
            response = httpx.post(
                running.url + "/v1/chat/completions", json={**body, "stream": stream}
            )
            assert response.status_code == 200
    finally:
        running.stop()
    assert len(seen) == 2 and set(loop_priority) == {loop_priority[0]}
    assert all(p == loop_priority[0] + WORKER_NICENESS for p in seen)


def test_conversations_keep_history_server_side(tmp_path: Path) -> None:
    from agentkit.services.conversations import ConversationStore

    model = ScriptedChatModel(lambda messages, **kw: f"{len(messages)} messages so far")
    app = create_app(model, None, conversations=ConversationStore(tmp_path / "c.sqlite"))
    running = Running(app)
    try:

        def say(text: str) -> str:
            body = {
                "model": "scripted",
                "conversation_id": "c1",
                "messages": [{"role": "user", "content": text}],
            }
            return httpx.post(running.url + "/v1/chat/completions", json=body).json()["choices"][0][
                "message"
            ]["content"]

        assert [say("a"), say("b"), say("c")] == [
            "1 messages so far",
            "3 messages so far",
            "5 messages so far",
        ]
        assert [m["content"] for m in model.calls[-1].messages] == [
            "a",
            "1 messages so far",
            "b",
            "3 messages so far",
            "c",
        ]
    finally:
        running.stop()


def test_history_is_trimmed_to_the_context(tmp_path: Path) -> None:
    from agentkit.services.conversations import trim_to_budget

    model = ScriptedChatModel([], context_length=60)
    history = [
        {"role": "user", "content": "word " * 10},
        {"role": "assistant", "content": "ok"},
    ] * 3
    kept = trim_to_budget(model, history, [{"role": "user", "content": "now"}], max_tokens=20)
    assert kept[-1]["content"] == "now" and len(kept) < 7
    assert model.count_tokens(kept) + 20 <= 60 and kept[0]["role"] == "user"


def test_the_chat_cli_talks_to_the_api_with_modes_sources_and_history(api) -> None:
    from typer.testing import CliRunner

    from agentkit.cli import app as cli

    running, _ = api
    script = "Which module needs zlib?\n/sources\n/mode nope\n/mode pal\n/history\n/quit\n"
    result = CliRunner().invoke(cli, ["chat", "--api-url", running.url], input=script)
    assert result.exit_code == 0, result.output
    assert "The aardvark module needs zlib [1]." in result.output
    assert "[1] " in result.output and "guide/install.md" in result.output
    assert "modes: rag, pal, react" in result.output and "pal>" in result.output
    assert "you: Which module needs zlib?" in result.output
