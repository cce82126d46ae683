"""The chat REST API (FastAPI): OpenAI-compatible chat completions over the agents.

``model`` picks the agent: ``agentkit-rag``, ``agentkit-pal``, ``agentkit-react``; any other
name passes through to the served model. Streaming is SSE in OpenAI's format, so the official
``openai`` client works unchanged; citations, PAL programs and ReAct steps ride along as an
extra ``agentkit`` field that such clients ignore.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from agentkit.errors import (
    AgentkitError,
    ContextBudgetError,
    InvalidQueryError,
    LLMError,
    ToolError,
)
from agentkit.llm import ChatModel, Usage
from agentkit.rag import RAG, Answer
from agentkit.retrievers import Index
from agentkit.services.conversations import ConversationStore, trim_to_budget
from agentkit.services.feedback import FeedbackStore
from agentkit.tools.sandbox import Sandbox

AGENTS = ("agentkit-rag", "agentkit-pal", "agentkit-react")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=200_000)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=500)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    user: str | None = Field(None, max_length=200)
    conversation_id: str | None = Field(None, min_length=1, max_length=200)


class FolderRequest(BaseModel):
    folder: str = Field(min_length=1, max_length=4096)


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4096)
    k: int = Field(5, ge=1, le=100)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"


class RatingFeedback(BaseModel):
    prompt: str = Field(min_length=1, max_length=100_000)
    completion: str = Field(max_length=100_000)
    rating: Literal[1, -1]
    comment: str | None = Field(None, max_length=10_000)
    labeler: str = Field(min_length=1, max_length=200)


class RankingFeedback(BaseModel):
    prompt: str = Field(min_length=1, max_length=100_000)
    ranking: list[str] = Field(min_length=2, max_length=50)
    ties: list[list[str]] | None = None
    comment: str | None = Field(None, max_length=10_000)
    labeler: str = Field(min_length=1, max_length=200)


@dataclass
class ApiConfig:
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    rate_limit_per_minute: int = 0  # 0: no limit
    cors_origins: tuple[str, ...] = ()
    document_roots: tuple[str, ...] = ()  # folders POST /v1/documents/folder may index
    upload_dir: str | None = None  # where uploaded files are kept; None: no uploads


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "agentkit_requests", "HTTP requests", ["path", "status"], registry=r
        )
        self.latency = Histogram(
            "agentkit_request_seconds", "Request latency", ["path"], registry=r
        )
        self.tokens = Counter("agentkit_tokens", "Model tokens", ["kind"], registry=r)
        self.steps = Counter("agentkit_agent_steps", "ReAct steps", registry=r)
        self.sandbox = Counter("agentkit_sandbox_runs", "Sandbox runs", ["outcome"], registry=r)


class LockedIndex:
    """An Index whose searches wait while a background job writes to it."""

    def __init__(self, index: Index, lock: threading.Lock) -> None:
        self._index, self._lock = index, lock

    def search(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._index.search(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index, name)


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def create_app(
    model: ChatModel,
    index: Index | None = None,
    *,
    feedback: FeedbackStore | None = None,
    config: ApiConfig | None = None,
    sandbox: Sandbox | None = None,
    conversations: ConversationStore | None = None,
) -> FastAPI:
    config = config or ApiConfig()
    metrics = Metrics()
    app = FastAPI(title="agentkit", version="0.1.0")
    app.state.model, app.state.index, app.state.metrics = model, index, metrics
    index_lock = threading.Lock()  # index writes (jobs) exclude searches; generation runs free
    shared = LockedIndex(index, index_lock) if index is not None else None
    buckets: dict[str, list[float]] = {}
    box = sandbox or Sandbox()
    jobs: dict[str, dict[str, Any]] = {}
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if length and (not length.isdigit() or int(length) > config.max_body_bytes):
            response: Any = JSONResponse(
                error_body(
                    f"request body larger than {config.max_body_bytes} bytes",
                    "invalid_request_error",
                    413,
                ),
                status_code=413,
            )
        else:
            response = await call_next(request)
        path = request.scope.get("route").path if request.scope.get("route") else "other"
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - started)
        return response

    def authorize(request: Request) -> str:
        if not config.api_keys:
            return "anonymous"
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in config.api_keys):
            raise HTTPException(401, "missing or invalid API key: send Authorization: Bearer KEY")
        if config.rate_limit_per_minute:
            now = time.monotonic()
            recent = [t for t in buckets.get(token, []) if now - t < 60]
            if len(recent) >= config.rate_limit_per_minute:
                raise HTTPException(429, "rate limit reached for this API key; retry in a minute")
            buckets[token] = [*recent, now]
        return token

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = {401: "authentication_error", 429: "rate_limit_error", 404: "not_found_error"}
        return JSONResponse(
            error_body(
                str(error.detail),
                kind.get(error.status_code, "invalid_request_error"),
                error.status_code,
            ),
            error.status_code,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse(error_body(problems[:2000], "invalid_request_error", 400), 400)

    @app.exception_handler(AgentkitError)
    async def ours(request: Request, error: AgentkitError) -> JSONResponse:
        status = 503  # the model server is down or unusable
        if isinstance(error, (InvalidQueryError, ContextBudgetError, ToolError)):
            status = 400
        elif isinstance(error, LLMError):
            status = 502  # the model server refused the request
        return JSONResponse(error_body(str(error), type(error).__name__, status), status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(
            error_body("internal error; see the server log", "server_error", 500), 500
        )

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = {"index": index is not None}
        try:
            model.context_length()
            checks["model"] = True
        except AgentkitError:
            checks["model"] = False
        ready = all(checks.values())
        return JSONResponse({"ready": ready, **checks}, 200 if ready else 503)

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode())

    @app.get("/v1/models")
    def models(_: str = Depends(authorize)) -> dict[str, Any]:
        names = list(AGENTS)
        try:
            names.append(getattr(model, "model", "model"))
        except AgentkitError:
            pass
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "agentkit"} for n in names
            ],
        }

    @app.post("/v1/search")
    def search(body: SearchRequest, _: str = Depends(authorize)) -> dict[str, Any]:
        if index is None:
            raise HTTPException(404, "no index is loaded: start the API with --index")
        with index_lock:
            hits = index.search(body.query, k=body.k, mode=body.mode)
        return {"object": "list", "data": [h.to_dict() for h in hits]}

    @app.post("/v1/feedback")
    def add_feedback(body: RatingFeedback | RankingFeedback, _: str = Depends(authorize)) -> dict:
        if feedback is None:
            raise HTTPException(404, "feedback is not enabled on this server")
        try:
            if isinstance(body, RatingFeedback):
                row = feedback.add_rating(
                    body.prompt, body.completion, body.rating, body.labeler, body.comment
                )
            else:
                row = feedback.add_ranking(
                    body.prompt, body.ranking, body.labeler, body.ties, body.comment
                )
        except ValueError as error:
            raise HTTPException(400, str(error)) from None
        return {"id": row, "object": "feedback"}

    @app.get("/v1/feedback/export")
    def export(format: Literal["pairwise"] = "pairwise", _: str = Depends(authorize)) -> Any:  # noqa: A002
        if feedback is None:
            raise HTTPException(404, "feedback is not enabled on this server")
        lines = (json.dumps(p, ensure_ascii=False) + "\n" for p in feedback.pairwise())
        return StreamingResponse(lines, media_type="application/x-ndjson")

    def start_job(kind: str, work: Any) -> dict[str, Any]:
        job_id = uuid.uuid4().hex[:16]
        jobs[job_id] = {
            "id": job_id,
            "kind": kind,
            "state": "running",
            "summary": None,
            "error": None,
        }

        def run() -> None:
            try:
                with index_lock:
                    summary = work()
                jobs[job_id].update(state="done", summary=summary.to_dict())
            except Exception as error:  # the job reports it; the server stays up
                jobs[job_id].update(state="failed", error=str(error))

        threading.Thread(target=run, name=f"index-{job_id}", daemon=True).start()
        return jobs[job_id]

    def need_index() -> Index:
        if index is None:
            raise HTTPException(404, "no index is loaded: start the API with --index")
        return index

    @app.post("/v1/documents/folder", status_code=202)
    def index_server_folder(body: FolderRequest, _: str = Depends(authorize)) -> dict[str, Any]:
        target = need_index()
        from pathlib import Path

        folder = Path(body.folder).resolve()
        roots = [Path(r).resolve() for r in config.document_roots]
        if not any(folder == r or folder.is_relative_to(r) for r in roots):
            raise HTTPException(403, "that folder is outside the configured document roots")
        if not folder.is_dir():
            raise HTTPException(400, f"{body.folder} is not a folder")
        return start_job("folder", lambda: target.sync_folder(folder))

    @app.post("/v1/documents", status_code=202)
    async def upload(request: Request, _: str = Depends(authorize)) -> dict[str, Any]:
        target = need_index()
        if config.upload_dir is None:
            raise HTTPException(404, "uploads are not enabled on this server")
        from pathlib import Path

        from agentkit.retrievers.loaders import load_file

        try:
            form = await request.form()
        except Exception:
            raise HTTPException(400, "send files as multipart/form-data") from None
        root = Path(config.upload_dir).resolve()
        docs = []
        for item in form.getlist("files"):
            if isinstance(item, str):
                continue
            name = Path(item.filename or "").name  # no folders, no traversal
            if not name or name.startswith("."):
                raise HTTPException(400, f"bad file name {item.filename!r}")
            raw = await item.read()
            root.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(raw)
            doc = load_file(root / name, root, raw=raw)
            if doc is not None:
                docs.append(doc)
        if not docs:
            raise HTTPException(400, "no indexable files (.md .txt .rst .html .pdf) in 'files'")
        return start_job("upload", lambda: target.add_documents(docs))

    @app.get("/v1/documents/jobs/{job_id}")
    def job_status(job_id: str, _: str = Depends(authorize)) -> dict[str, Any]:
        if job_id not in jobs:
            raise HTTPException(404, f"no job {job_id}")
        return jobs[job_id]

    @app.delete("/v1/documents/{source:path}")
    def delete_document(source: str, _: str = Depends(authorize)) -> dict[str, Any]:
        target = need_index()
        with index_lock:
            removed = target.remove_source(source)
        if not removed:
            raise HTTPException(404, f"no document with source {source!r}")
        return {"deleted": source, "documents": removed}

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest, _: str = Depends(authorize)) -> Any:
        question = next((m.content for m in reversed(body.messages) if m.role == "user"), "")
        if body.model in AGENTS and not question.strip():
            raise HTTPException(400, "messages must include a user message with the question")
        if body.model in ("agentkit-rag", "agentkit-react") and index is None:
            raise HTTPException(400, f"{body.model} needs an index: start the API with --index")
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        new_messages = [m.model_dump() for m in body.messages]
        remember = None
        if body.conversation_id and conversations is not None:
            history = conversations.history(body.conversation_id)
            body.messages = [
                ChatMessage(**m)
                for m in trim_to_budget(model, history, new_messages, body.max_tokens or 256)
            ]

            def remember(text: str) -> None:
                conversations.append(
                    body.conversation_id,
                    [  # type: ignore[arg-type]
                        *new_messages,
                        {"role": "assistant", "content": text},
                    ],
                )

        if body.stream:
            streamed = Usage()
            events = stream_events(body, question, streamed)

            def finished(text: str) -> None:
                count_tokens(streamed)
                if remember is not None:
                    remember(text)

            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                sse(
                    events,
                    completion_id,
                    created,
                    body.model,
                    finished,
                    streamed if include_usage else None,
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts, extra, usage = run_agent(body, question)
        if remember is not None:
            remember(texts[0])
            extra = {**extra, "conversation_id": body.conversation_id}
        count_tokens(usage)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
                for i, t in enumerate(texts)
            ],
            "usage": openai_usage(usage),
            **({"agentkit": extra} if extra else {}),
        }

    def count_tokens(usage: Usage) -> None:
        metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        metrics.tokens.labels("completion").inc(usage.completion_tokens)

    def run_agent(body: ChatRequest, question: str) -> tuple[list[str], dict, Usage]:
        if body.model == "agentkit-rag":
            answer = RAG(shared, model, max_tokens=body.max_tokens or 384).ask(question)  # type: ignore[arg-type]
            extra = {
                "citations": [c.to_dict() for c in answer.citations],
                "invalid_citations": answer.invalid_citations,
                "answered": answer.answered,
            }
            return [answer.text], extra, answer.usage
        if body.model == "agentkit-pal":
            from agentkit.pal import PAL

            solved = PAL(model, box).solve(question)
            metrics.sandbox.labels(solved.result.error_type or "ok").inc()
            return (
                [solved.text or (solved.result.error or "")],
                {"pal": solved.to_dict()},
                solved.usage,
            )
        if body.model == "agentkit-react":
            from agentkit.react import ReAct

            result = ReAct(model, index=shared).run(question)  # type: ignore[arg-type]
            metrics.steps.inc(len(result.steps))
            return [result.answer], {"react": result.to_dict()}, result.usage
        done = model.complete(
            [m.model_dump() for m in body.messages],
            stop=stops(body.stop),
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            n=body.n,
        )
        return done.texts, {}, done.usage

    def stream_events(
        body: ChatRequest, question: str, usage: Usage
    ) -> Iterator[tuple[str, dict | None]]:
        """(text piece, extra) events; the API's SSE framing wraps them. ``usage`` is filled in
        as the model reports it (by the end of the stream)."""

        def count(more: Usage) -> None:
            usage.prompt_tokens += more.prompt_tokens
            usage.completion_tokens += more.completion_tokens

        if body.model == "agentkit-rag":
            rag = RAG(shared, model, max_tokens=body.max_tokens or 384)  # type: ignore[arg-type]
            for item in rag.stream(question):
                if isinstance(item, Answer):
                    count(item.usage)
                    citations = [c.to_dict() for c in item.citations]
                    yield "", {"citations": citations, "invalid_citations": item.invalid_citations}
                else:
                    yield item, None
        elif body.model == "agentkit-react":
            from agentkit.react import ReAct, Step

            for item in ReAct(model, index=shared).steps(question):  # type: ignore[arg-type]
                if isinstance(item, Step):
                    metrics.steps.inc()
                    yield "", {"step": item.to_dict()}
                else:
                    count(item.usage)
                    yield item.answer, None
        elif body.model == "agentkit-pal":
            texts, extra, pal_usage = run_agent(body, question)
            count(pal_usage)
            yield "", extra
            yield texts[0], None
        else:
            for delta in model.stream(
                [m.model_dump() for m in body.messages],
                stop=stops(body.stop),
                max_tokens=body.max_tokens,
                temperature=body.temperature,
            ):
                if delta.usage is not None:
                    count(delta.usage)
                if delta.text:
                    yield delta.text, None

    return app


def openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def stops(stop: str | list[str] | None) -> list[str] | None:
    return [stop] if isinstance(stop, str) else stop


def sse(
    events: Iterator[tuple[str, dict | None]],
    completion_id: str,
    created: int,
    model: str,
    on_done: Any = None,
    usage: Usage | None = None,
) -> Iterator[str]:
    """OpenAI's chunk framing: a role chunk, content chunks, a finish chunk, ``[DONE]``; with
    ``usage`` (``stream_options.include_usage``), a chunk with no choices and the usage last."""

    def frame(**fields: Any) -> str:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            **fields,
        }
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def chunk(delta: dict[str, Any], finish: str | None, extra: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return frame(choices=[choice], **({"agentkit": extra} if extra else {}))

    yield chunk({"role": "assistant", "content": ""}, None)
    parts: list[str] = []
    try:
        for text, extra in events:
            parts.append(text)
            yield chunk({"content": text} if text else {}, None, extra)
    except AgentkitError as error:
        yield f"data: {json.dumps(error_body(str(error), type(error).__name__, 503))}\n\n"
        return
    if on_done is not None:
        on_done("".join(parts))
    yield chunk({}, "stop")
    if usage is not None:
        yield frame(choices=[], usage=openai_usage(usage))
    yield "data: [DONE]\n\n"
