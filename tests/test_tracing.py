"""OpenTelemetry spans of RAG, PAL and ReAct runs (in-memory exporter), the trace context onward
to the model server, OTLP/HTTP export to a receiver on loopback, and nothing at all when off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fakes import HashingEmbedder

from agentkit import Index, index_folder, tracing
from agentkit.llm import OpenAIChatModel
from agentkit.pal import PAL
from agentkit.rag import RAG
from agentkit.react import ReAct
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel
from agentkit.tools.sandbox import Sandbox

otel_sdk = pytest.importorskip(
    "opentelemetry.sdk.trace", reason="the opentelemetry extra is not installed"
)
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

ROOT = Path(__file__).resolve().parents[1]
EXPORTER = InMemorySpanExporter()
PROVIDER = otel_sdk.TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    tracing.enable(PROVIDER, content=False)
    try:
        yield EXPORTER
    finally:
        tracing.disable()
        EXPORTER.clear()


@pytest.fixture
def index(docs: Path, settings: Settings, embedder: HashingEmbedder) -> Iterator[Index]:
    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as opened:
        yield opened


def tree(exporter: InMemorySpanExporter) -> dict[str, Any]:
    """name -> list of the spans so named; each span's parent name under ``parent``."""
    finished = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    out: dict[str, Any] = {}
    for s in finished:
        parent = by_id.get(s.parent.span_id) if s.parent else None
        out.setdefault(s.name, []).append(
            {"parent": parent.name if parent else None, "attributes": dict(s.attributes or {})}
        )
    assert len({s.context.trace_id for s in finished}) == 1, "one run is one trace"
    return out


def test_a_rag_run_is_an_agent_span_with_retrieval_and_a_chat_call(spans, index: Index) -> None:
    RAG(index, ScriptedChatModel(["Aardvark needs zlib [1]."]), k=3, min_similarity=0.0).ask(
        "Which module needs zlib?"
    )
    got = tree(spans)
    assert set(got) == {"invoke_agent agentkit-rag", "retrieval", "chat scripted"}
    run = got["invoke_agent agentkit-rag"][0]
    assert run["parent"] is None
    assert run["attributes"]["gen_ai.operation.name"] == "invoke_agent"
    assert run["attributes"]["agentkit.rag.answered"] is True
    retrieval = got["retrieval"][0]
    assert retrieval["parent"] == "invoke_agent agentkit-rag"
    assert retrieval["attributes"]["agentkit.retrieval.k"] == 3
    assert retrieval["attributes"]["agentkit.retrieval.mode"] == "hybrid"
    assert retrieval["attributes"]["agentkit.retrieval.hits"] == 3
    assert retrieval["attributes"]["agentkit.retrieval.query"] == "Which module needs zlib?"
    chat = got["chat scripted"][0]
    assert chat["parent"] == "invoke_agent agentkit-rag"
    attributes = chat["attributes"]
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.response.model"] == "scripted"
    assert attributes["gen_ai.request.temperature"] == 0.0
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert "gen_ai.input.messages" not in attributes
    assert "gen_ai.output.messages" not in attributes


def test_a_streamed_rag_run_has_the_same_tree_and_leaves_no_span_current(
    spans, index: Index
) -> None:
    from opentelemetry import trace

    items = list(
        RAG(index, ScriptedChatModel(["Aardvark [1]."]), min_similarity=0.0).stream("zlib?")
    )
    assert items[-1].answered
    got = tree(spans)
    assert got["retrieval"][0]["parent"] == "invoke_agent agentkit-rag"
    assert got["chat"][0]["parent"] == "invoke_agent agentkit-rag"
    assert got["chat"][0]["attributes"]["gen_ai.request.stream"] is True
    assert not trace.get_current_span().get_span_context().is_valid


def test_a_pal_run_has_its_chat_call_and_sandbox_run_without_the_program(spans) -> None:
    program = "```python\ndef solution():\n    return 6 * 7\n```"
    with Sandbox(timeout_s=5) as box:
        answer = PAL(ScriptedChatModel([program]), box).solve("Six sevens?")
    assert answer.value == 42
    got = tree(spans)
    assert set(got) == {"invoke_agent agentkit-pal", "chat scripted", "sandbox_run"}
    run = got["invoke_agent agentkit-pal"][0]["attributes"]
    assert run["agentkit.pal.ok"] is True and run["gen_ai.usage.output_tokens"] > 0
    sandbox = got["sandbox_run"][0]
    assert sandbox["parent"] == "invoke_agent agentkit-pal"
    assert sandbox["attributes"]["agentkit.sandbox.outcome"] == "ok"
    assert sandbox["attributes"]["agentkit.sandbox.duration_ms"] > 0
    assert "agentkit.sandbox.program" not in sandbox["attributes"]


def test_program_text_and_prompts_are_recorded_only_when_content_capture_is_on(spans) -> None:
    tracing.enable(PROVIDER, content=True)
    with Sandbox(timeout_s=5) as box:
        PAL(ScriptedChatModel(["def solution():\n    return 1"]), box).solve("One?")
    got = tree(spans)
    assert "return 1" in got["sandbox_run"][0]["attributes"]["agentkit.sandbox.program"]
    chat = got["chat scripted"][0]["attributes"]
    assert json.loads(chat["gen_ai.input.messages"])[-1]["content"].endswith("One?")
    assert json.loads(chat["gen_ai.output.messages"]) == ["def solution():\n    return 1"]


def test_a_react_run_has_a_span_per_step_with_its_chat_call_and_tool_call(
    spans, index: Index
) -> None:
    model = ScriptedChatModel(
        [
            "Thought: look it up\nAction: search[zlib]",
            "Thought: found it\nAction: finish[aardvark]",
        ]
    )
    result = ReAct(model, index=index).run("Which module needs zlib?")
    assert result.answer == "aardvark"
    got = tree(spans)
    steps = got["react_step"]
    assert [s["attributes"]["agentkit.step.action"] for s in steps] == ["search", "finish"]
    assert all(s["parent"] == "invoke_agent agentkit-react" for s in steps)
    assert [c["parent"] for c in got["chat scripted"]] == ["react_step", "react_step"]
    tool = got["execute_tool search"][0]
    assert tool["parent"] == "react_step"
    assert tool["attributes"]["gen_ai.tool.name"] == "search"
    assert "gen_ai.tool.call.arguments" not in tool["attributes"]
    assert got["retrieval"][0]["parent"] == "execute_tool search"
    run = got["invoke_agent agentkit-react"][0]["attributes"]
    assert run["agentkit.react.steps"] == 2 and run["agentkit.react.finished"] is True


def test_a_failing_tool_marks_its_span(spans) -> None:
    def broken(query: str) -> str:
        """Always fails."""
        raise RuntimeError("disk on fire")

    model = ScriptedChatModel(["Thought: t\nAction: broken[x]", "Thought: t\nAction: finish[no]"])
    ReAct(model, tools=[broken]).run("q")
    tool = tree(spans)["execute_tool broken"][0]
    assert tool["attributes"]["error.type"] == "RuntimeError"
    step = tree(spans)["react_step"][0]["attributes"]
    assert step["agentkit.step.tool_error"] is True


def test_model_requests_carry_the_traceparent_of_their_chat_span(spans) -> None:
    seen: list[str | None] = []

    class Handle(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            seen.append(self.headers.get("traceparent"))
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps(
                {
                    "model": "fake",
                    "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with OpenAIChatModel(f"http://127.0.0.1:{server.server_address[1]}", model="fake") as m:
            tracing.complete(m, [{"role": "user", "content": "hi"}], max_tokens=4)
    finally:
        server.shutdown()
        server.server_close()
    chat = spans.get_finished_spans()[0]
    assert chat.name == "chat fake"
    trace_id, span_id = f"{chat.context.trace_id:032x}", f"{chat.context.span_id:016x}"
    assert len(seen) == 1 and (seen[0] or "").startswith(f"00-{trace_id}-{span_id}-")


def test_tracing_off_is_a_shared_no_op_and_sends_no_traceparent() -> None:
    tracing.disable()
    assert tracing.span("x") is tracing.NO_SPAN and tracing.headers() == {}
    assert tracing.current_context() is None


SCRIPT = """
import sys
from agentkit import Index, index_folder
from agentkit.rag import RAG
from agentkit.settings import Settings
from agentkit.testing import HashingEmbedder, ScriptedChatModel
folder, index_path = sys.argv[1], sys.argv[2]
settings = Settings(index=index_path)
index_folder(folder, index_path, settings=settings, embedder=HashingEmbedder())
with Index.open(index_path, settings=settings, embedder=HashingEmbedder()) as index:
    RAG(index, ScriptedChatModel(["Aardvark [1]."]), min_similarity=0.0).ask("zlib?")
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""


def run_script(docs: Path, tmp_path: Path, env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(docs), str(tmp_path / "index")],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_without_the_otel_variables_opentelemetry_is_never_imported(
    docs: Path, tmp_path: Path
) -> None:
    assert run_script(docs, tmp_path, {}) == "[]"


def test_spans_arrive_at_an_otlp_http_receiver_on_loopback(docs: Path, tmp_path: Path) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[tuple[str, str, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.path, self.headers.get("Content-Type", ""), body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_SERVICE_NAME": "agentkit-test"}
        imported = run_script(docs, tmp_path, env)
    finally:
        server.shutdown()
        server.server_close()
    assert "opentelemetry.sdk.trace" in imported
    assert received and all(path == "/v1/traces" for path, _, _ in received)
    assert all(kind == "application/x-protobuf" for _, kind, _ in received)
    names, services = set(), set()
    for _, _, body in received:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            services |= {
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            }
            for scope in resource_spans.scope_spans:
                names |= {s.name for s in scope.spans}
    assert services == {"agentkit-test"}
    assert {"invoke_agent agentkit-rag", "retrieval", "chat scripted"} <= names


def test_api_requests_take_and_give_the_trace_context(spans, index: Index) -> None:
    import httpx
    from fake_server import serving

    from agentkit.services.api import create_app

    app = create_app(ScriptedChatModel(["Aardvark needs zlib [1]."]), index)
    caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    body = {"model": "agentkit-rag", "messages": [{"role": "user", "content": "zlib?"}]}
    with serving(app) as base:
        response = httpx.post(
            f"{base}/v1/chat/completions",
            json=body,
            headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"},
            timeout=60,
        )
    assert response.status_code == 200
    finished = {s.name: s for s in spans.get_finished_spans()}
    request = finished["POST /v1/chat/completions"]
    assert f"{request.context.trace_id:032x}" == caller_trace
    assert f"{request.parent.span_id:016x}" == caller_span and request.parent.is_remote
    assert request.attributes["http.response.status_code"] == 200
    assert finished["invoke_agent agentkit-rag"].parent.span_id == request.context.span_id
    assert response.headers["traceparent"].startswith(
        f"00-{caller_trace}-{request.context.span_id:016x}-"
    )


def test_a_stream_read_only_in_part_ends_its_spans_without_an_error(spans, index: Index) -> None:
    stream = RAG(index, ScriptedChatModel(["One two three [1]."]), min_similarity=0.0).stream("q")
    next(stream)
    stream.close()
    finished = {s.name: s for s in spans.get_finished_spans()}
    run = finished["invoke_agent agentkit-rag"]
    assert run.attributes["agentkit.closed_early"] is True and run.status.is_ok


def test_guard_steps_have_a_span_hook(spans) -> None:
    with tracing.guard_span("pii", stage="input") as guard:
        guard.set("agentkit.guard.verdict", "safe")
    (span,) = spans.get_finished_spans()
    assert span.name == "guard pii"
    assert dict(span.attributes) == {
        "agentkit.guard.name": "pii",
        "agentkit.guard.stage": "input",
        "agentkit.guard.verdict": "safe",
    }
