"""The chat REST API (FastAPI): OpenAI-compatible chat completions over the agents.

``model`` picks the agent: ``agentkit-rag``, ``agentkit-pal``, ``agentkit-react``; any other
name passes through to the served model. Streaming is SSE in OpenAI's format, so the official
``openai`` client works unchanged; citations, PAL programs and ReAct steps ride along as an
extra ``agentkit`` field that such clients ignore.

Trust boundaries: every request is made by a caller (an API key's name and role, see
``parse_api_keys``); conversations, feedback, jobs and uploads record it, and other keys get 404
for them. Admins also manage documents and export everyone's feedback. Bodies are counted as they
arrive (chunked ones too), uploads never write through a link, and responses carry security
headers and no absolute server paths.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from agentkit.agents import (
    PASS_THROUGH,
    AgentContext,
    AgentEvent,
    AgentRequest,
    agent_names,
    get_agent,
    run_agent,
    stream_agent,
)
from agentkit.budget import token_upper_bound
from agentkit.errors import (
    AgentkitError,
    ConfigError,
    ContextBudgetError,
    InvalidPathError,
    InvalidQueryError,
    LLMError,
    ToolError,
)
from agentkit.llm import ChatModel, Usage
from agentkit.prompts import load_messages
from agentkit.retrievers import Index
from agentkit.retrievers.uploads import (
    UploadOwners,
    check_file_name,
    check_upload_name,
    existing_upload,
    write_upload,
)
from agentkit.services.conversations import (
    ConversationNotFound,
    ConversationStore,
    trim_to_budget,
)
from agentkit.services.feedback import FeedbackStore
from agentkit.sse import DONE
from agentkit.tools.sandbox import Sandbox

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from agentkit.settings import Settings

logger = logging.getLogger("agentkit.api")
ROLES = ("admin", "user")
JOB_SHUTDOWN_WAIT_S = 120  # on shutdown, how long each running indexing job is waited for
CHAT_WORKERS = 256  # chat requests answered at once (a thread each); more get a 503
STREAM_BUFFER = 32  # events a stream's worker may run ahead of a slow client
SHUTDOWN_MARGIN_S = 1.0  # after the grace period, for streams to send their last event
FORCED_EXIT_S = 1.0  # after a second signal, how long the orderly exit may take before _exit
SHUTTING_DOWN = "the server is shutting down; send the request again"
NOT_BLANK = r"\S"  # what a field the server reads as text must contain


class StrictModel(BaseModel):
    """A request body read as JSON: no coercion (``stream: 0``, ``temperature: false`` and
    ``k: "5"`` are 400s, as the schema says), unknown fields ignored (OpenAI clients send more)."""

    model_config = ConfigDict(strict=True)


def whole_number(value: object) -> object:
    """JSON does not tell 5 from 5.0, nor does JSON Schema's ``integer``: an integral float is
    that integer (``true`` stays refused). For the ``int`` fields of a StrictModel."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=200_000)


class StreamOptions(StrictModel):
    include_usage: bool = False


class ChatRequest(StrictModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "agentkit-rag",
                    "messages": [{"role": "user", "content": "Which module needs zlib?"}],
                }
            ]
        }
    )

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

    _whole_numbers = field_validator("max_tokens", "n", mode="before")(whole_number)


class FolderRequest(StrictModel):
    folder: str = Field(min_length=1, max_length=4096)


class SearchRequest(StrictModel):
    query: str = Field(min_length=1, max_length=4096, pattern=NOT_BLANK)
    k: int = Field(5, ge=1, le=100)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"

    _whole_numbers = field_validator("k", mode="before")(whole_number)


class RatingFeedback(StrictModel):
    prompt: str = Field(min_length=1, max_length=100_000)
    completion: str = Field(max_length=100_000)
    rating: Literal[1, -1]
    comment: str | None = Field(None, max_length=10_000)
    labeler: str = Field(min_length=1, max_length=200)

    @field_validator("rating", mode="before")
    @classmethod
    def not_a_boolean(cls, rating: object) -> object:
        if isinstance(rating, bool):  # True == 1 would pass Literal[1, -1]
            raise ValueError("rating must be the number 1 or -1")
        return rating


class RankingFeedback(StrictModel):
    prompt: str = Field(min_length=1, max_length=100_000)
    ranking: list[str] = Field(min_length=2, max_length=50, json_schema_extra={"uniqueItems": True})
    ties: list[Annotated[list[str], Field(min_length=2)]] | None = None  # of ranked ones
    comment: str | None = Field(None, max_length=10_000)
    labeler: str = Field(min_length=1, max_length=200)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, for every 4xx and 5xx (and for an error event inside a stream)."""

    error: ErrorDetail


class Readiness(BaseModel):
    ready: bool
    index: bool
    model: bool


ERRORS = {
    400: "The request cannot be served as sent (a malformed body, a question longer than the "
    "model's context, a file no loader opens, ...)",
    401: "A missing or unknown API key (only when keys are set)",
    403: "The API key's role may not do this",
    404: "Nothing by that name for this API key, or the feature is not enabled here",
    409: "It conflicts with what another API key owns",
    413: "The body is larger than AGENTKIT_API_MAX_BODY_BYTES",
    429: "The API key's rate limit is reached; retry in a minute",
    502: "The model server refused the request",
    503: "The model server cannot be reached, or this server is shutting down",
}


# One event of a chat stream: a chunk, an error, or the end.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "type": "object",
                        "anyOf": [
                            {
                                "required": ["id", "object", "choices"],
                                "properties": {"object": {"const": "chat.completion.chunk"}},
                            },
                            {"required": ["error"], "properties": {"error": {"type": "object"}}},
                        ],
                    },
                },
            ]
        }
    },
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` documenting error statuses in OpenAI's error shape."""
    return {s: {"model": ErrorResponse, "description": ERRORS[s]} for s in statuses}


def text_body(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` documenting a 200 that is text of ``media_type``."""
    content = {media_type: {"schema": {"type": "string"}}}
    return {200: {"description": description, "content": content}}


@dataclass(frozen=True)
class ApiKey:
    """One accepted bearer key: its ``name`` is what records are owned by, never the key."""

    name: str
    role: Literal["admin", "user"]
    key: str = field(repr=False)


@dataclass(frozen=True)
class Caller:
    """Who makes a request: the key's name and role (``anonymous`` admin on an open API)."""

    name: str
    role: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def owner(self) -> str | None:
        """What this caller's records are owned by: the key's name; None on an open API (records
        no key owns: once keys are set, only admins reach them)."""
        return None if self is ANONYMOUS else self.name


ANONYMOUS = Caller("anonymous", "admin")  # no keys set: one implicit owner who may do anything
KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_api_keys(entries: Iterable[str | ApiKey]) -> tuple[ApiKey, ...]:
    """``name:role:key`` entries (role ``admin`` or ``user``; the key may itself hold colons),
    or bare keys (no colon), which are admins named ``key1``, ``key2``, … in the order the bare
    keys are listed. Raises ConfigError naming the entry (never the key) when one is malformed.
    """
    keys: list[ApiKey] = []
    bare = 0
    for number, entry in enumerate(entries, 1):
        if isinstance(entry, ApiKey):
            keys.append(entry)
            continue
        entry = entry.strip()
        if ":" not in entry:
            bare += 1
            name, role, key = f"key{bare}", "admin", entry
        else:
            parts = entry.split(":", 2)
            if len(parts) != 3:
                raise ConfigError(
                    f"AGENTKIT_API_KEYS entry {number} is not name:role:key (or a bare key "
                    "without ':'); fix that entry"
                )
            name, role, key = (p.strip() for p in parts)
        if not key:
            raise ConfigError(f"AGENTKIT_API_KEYS entry {number} has an empty key; give it one")
        if not KEY_NAME.fullmatch(name):
            raise ConfigError(
                f"AGENTKIT_API_KEYS entry {number}: the name must be 1-64 letters, digits, '_', "
                "'.' or '-'"
            )
        if role not in ROLES:
            raise ConfigError(
                f"AGENTKIT_API_KEYS entry {number} ({name}): unknown role {role!r}; "
                f"use one of {', '.join(ROLES)}"
            )
        keys.append(ApiKey(name, role, key))  # type: ignore[arg-type]
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"AGENTKIT_API_KEYS names {', '.join(twice)} twice; names must differ")
    if len({k.key for k in keys}) != len(keys):
        raise ConfigError("AGENTKIT_API_KEYS lists the same key twice; give each name its own key")
    return tuple(keys)


class JobRunner:
    """Index jobs in the background, a thread each. A job's record (``id``, ``kind``, ``owner``,
    ``state``: running, done or failed, ``summary`` or ``error``) is kept by id; ``report``
    rewrites what a record shows (e.g. absolute paths made relative)."""

    def __init__(self, report: Callable[[str], str] = str) -> None:
        self.report = report
        self._jobs: dict[str, dict[str, Any]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, kind: str, owner: str | None, work: Callable[[], Any]) -> dict[str, Any]:
        """Run ``work`` (returning a ``SyncSummary``) in a thread; the job's record as it starts."""
        job_id = uuid.uuid4().hex[:16]
        record = {"id": job_id, "kind": kind, "owner": owner, "state": "running",
                  "summary": None, "error": None}  # fmt: skip
        self._jobs[job_id] = record

        def run() -> None:
            try:
                summary = work().to_dict()
                summary["index"] = Path(summary["index"]).name
                summary["warnings"] = [self.report(w) for w in summary["warnings"]]
                record.update(state="done", summary=summary)
            except Exception as error:  # the job reports it; the server stays up
                record.update(state="failed", error=self.report(str(error)) or type(error).__name__)

        thread = threading.Thread(target=run, name=f"index-{job_id}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return dict(record)

    def get(self, job_id: str) -> dict[str, Any] | None:
        record = self._jobs.get(job_id)
        return dict(record) if record is not None else None

    def running(self) -> list[threading.Thread]:
        with self._lock:
            return [t for t in self._threads if t.is_alive()]


class RateLimiter:
    """At most ``per_minute`` requests per key in any sliding minute (0: no limit). Each key
    keeps the times of its last ``per_minute`` requests, so memory is bounded per key."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.clock = per_minute, clock
        self._recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Whether ``key`` may make a request now (and, if so, count it)."""
        if not self.per_minute:
            return True
        now = self.clock()
        with self._lock:
            recent = self._recent.setdefault(key, deque())
            while recent and now - recent[0] >= 60:
                recent.popleft()
            if len(recent) >= self.per_minute:
                return False
            recent.append(now)
            return True


async def current_caller(request: Request) -> Caller:
    """The caller making ``request`` (a FastAPI dependency): 401 without a valid key, 429 over
    the rate limit. Async: a key check is quick, and on the event loop it costs no pool thread."""
    return request.app.state.authorize(request)


AUTHORIZED = Depends(current_caller)


async def current_admin(caller: Caller = AUTHORIZED) -> Caller:
    """The caller, when it is an admin; else 403."""
    if not caller.admin:
        raise HTTPException(
            403, f"this needs an admin API key; the key {caller.name!r} has the role user"
        )
    return caller


async def docs_reader(request: Request) -> Caller:
    """The caller of /metrics and the API's docs: any key when they are protected, else anyone."""
    return await current_caller(request) if request.app.state.protect_docs else ANONYMOUS


ADMIN = Depends(current_admin)
DOCS_READER = Depends(docs_reader)


@dataclass
class ApiConfig:
    api_keys: tuple[str | ApiKey, ...] = ()  # entries of AGENTKIT_API_KEYS, see parse_api_keys
    max_body_bytes: int = 1 << 20
    rate_limit_per_minute: int = 0  # 0: no limit
    cors_origins: tuple[str, ...] = ()
    document_roots: tuple[str, ...] = ()  # folders POST /v1/documents/folder may index
    upload_dir: str | None = None  # where uploaded files are kept; None: no uploads
    protect_docs: bool | None = None  # /metrics, /docs, /redoc, /openapi.json need a key;
    # None: when keys are set
    shutdown_grace_s: float = 10.0  # on shutdown, how long open chat requests may still run
    keys: tuple[ApiKey, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys = parse_api_keys(self.api_keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiConfig:
        """The API's configuration from ``AGENTKIT_API_*`` settings (ConfigError if malformed)."""

        def listed(text: str | None) -> tuple[str, ...]:
            return tuple(item.strip() for item in (text or "").split(",") if item.strip())

        return cls(
            api_keys=listed(settings.api_keys),
            max_body_bytes=settings.api_max_body_bytes,
            rate_limit_per_minute=settings.api_rate_limit_per_minute,
            document_roots=listed(settings.api_document_roots),
            upload_dir=str(settings.api_upload_dir) if settings.api_upload_dir else None,
            protect_docs=settings.api_protect_docs,
            shutdown_grace_s=settings.api_shutdown_grace_s,
        )


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


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# The API answers JSON, SSE and text, none of which needs to load anything: nothing may be
# loaded or framed. FastAPI's /docs (Swagger UI) and /redoc pages load their scripts, styles and
# fonts from cdn.jsdelivr.net (and Google Fonts, for ReDoc) and start with an inline script whose
# text depends on the request's root path, so they get a policy of their own that allows those
# origins and inline code, on those two pages only. A page served from the API's own origin
# (e.g. a web UI at /) would need its own entry here, e.g. "default-src 'self'".
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com "
    "https://cdn.redoc.ly; connect-src 'self'; worker-src blob:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'"
)
WEB_CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
PAGE_CSP = {"/docs": DOCS_CSP, "/redoc": DOCS_CSP, "/": WEB_CSP}  # "/": the web page


def security_headers(path: str) -> dict[str, str]:
    """The headers every response carries; the CSP depends on the page."""
    return {
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": PAGE_CSP.get(path, API_CSP),
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }


class SecurityHeaders:
    """ASGI middleware: adds ``security_headers`` to every response and drops any ``server``
    header (uvicorn's own banner is turned off where it is started: ``server_header=False``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [
            (k.lower().encode(), v.encode()) for k, v in security_headers(scope["path"]).items()
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k for k, _ in extra} | {b"server"}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"request body larger than {limit} bytes; send a smaller body or fewer files"
        )


class BodyLimit:
    """ASGI middleware: a body longer than ``limit`` bytes gets 413, whether it says its length
    (Content-Length) or not (chunked): bytes are counted as the app receives them, and reading
    stops at the limit with ``BodyTooLarge``, which the routes answer as a 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = BodyTooLarge(self.limit)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self.refuse(too_large, scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            if received > self.limit:
                raise too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise too_large
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if started:
                raise
            await self.refuse(too_large, scope, receive, send)

    @staticmethod
    async def refuse(error: BodyTooLarge, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(str(error.detail), "invalid_request_error", 413)
        await JSONResponse(body, 413, headers={"Connection": "close"})(scope, receive, send)


class RequestMetrics:
    """ASGI middleware: counts each request by route and status and times it to its last byte
    (a plain ASGI layer: Starlette's BaseHTTPMiddleware would stand between a stream and the
    client's disconnect)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app answers: an exception becomes a 500 further out

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            path = route.path if route is not None else "other"
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


class Shutdown:
    """The server is stopping: chat requests still open get ``grace_s`` more seconds, then a
    stream ends with an error event and ``[DONE]`` and a request still waiting for its answer
    gets a 503; new chat requests get a 503 at once.

    ``begin()`` may be called from any thread; calling it again with a shorter grace
    (``begin(0)``: a second signal) brings the end forward. Waiters may sit on any event loop
    (a TestClient runs each request on a loop of its own).
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.deadline: float | None = None  # time.monotonic() when the grace period ends
        self._lock = threading.Lock()
        self._ended: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def started(self) -> bool:
        return self.deadline is not None

    def begin(self, grace_s: float | None = None) -> None:
        """Start the grace period (``grace_s``, else the configured one) now."""
        deadline = time.monotonic() + max(0.0, self.grace_s if grace_s is None else grace_s)
        with self._lock:
            if self.deadline is not None and self.deadline <= deadline:
                return
            self.deadline = deadline
            loops = list(self._ended)
        for loop in loops:
            try:
                loop.call_soon_threadsafe(self._arm, loop)
            except RuntimeError:  # that loop is closed
                pass

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        ended, deadline = self._ended.get(loop), self.deadline
        if ended is not None and deadline is not None:
            loop.call_later(max(0.0, deadline - time.monotonic()), ended.set)

    async def ended(self) -> None:
        """Returns when the grace period is over."""
        loop = asyncio.get_running_loop()
        with self._lock:
            ended = self._ended.get(loop)
            if ended is None:
                ended = self._ended[loop] = asyncio.Event()
                if self.deadline is not None:
                    self._arm(loop)
        await ended.wait()

    def seconds_left(self, default: float) -> float:
        """Seconds to the end of the grace period; ``default`` when no shutdown has begun."""
        deadline = self.deadline
        return default if deadline is None else max(0.0, deadline - time.monotonic())


class SignalHandling:
    """What SIGINT/SIGTERM do to ``agentkit serve`` (``serve``): the first stops accepting
    connections and gives open requests the grace period (``Shutdown``); a second one ends open
    streams at once and exits: if the orderly exit has not finished ``FORCED_EXIT_S`` later,
    the process ends there (``os._exit``; the stores are SQLite, which rolls back what was not
    committed). Unlike uvicorn's own handling, the signal is not raised again once the server
    has stopped: ``agentkit serve`` still has its cleanup to do (the stores, a model server).

    uvicorn installs its handlers (its ``Server.handle_exit``) as it starts serving; the app's
    lifespan calls ``take_over()`` next, in the main thread, which puts these in their place
    and keeps uvicorn's server to stop. Without uvicorn's handlers there, nothing changes.
    """

    def __init__(self, stopping: Shutdown, on_forced_exit: Callable[[], object] | None) -> None:
        self.stopping, self.on_forced_exit = stopping, on_forced_exit
        self.forced = False

    def take_over(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if not isinstance(server, uvicorn.Server):
            return
        loop = asyncio.get_running_loop()

        def on_signal(sig: int, frame: FrameType | None) -> None:
            second = server.should_exit
            server.should_exit = True
            if second:
                # Not uvicorn's force_exit: it skips the app's shutdown, which is quick now
                # that the grace period is over. The backstop bounds the rest.
                self.forced = True
                backstop = threading.Timer(FORCED_EXIT_S, self.exit_now)
                backstop.daemon = True
                backstop.start()
            # Not inside the handler: it may have interrupted this thread while it held the
            # Shutdown's lock.
            loop.call_soon_threadsafe(self.stopping.begin, 0.0 if second else None)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    def exit_now(self) -> None:
        try:
            if self.on_forced_exit is not None:
                self.on_forced_exit()
        finally:
            os._exit(1)


def serve(
    app: FastAPI,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    on_forced_exit: Callable[[], object] | None = None,
) -> bool:
    """Serve ``app`` (from ``create_app``) with uvicorn until SIGINT/SIGTERM; see
    ``SignalHandling`` for what one and two signals do (``on_forced_exit`` runs before a forced
    ``os._exit``). False when a second signal forced the exit."""
    stopping: Shutdown = app.state.shutdown
    signals = app.state.signals = SignalHandling(stopping, on_forced_exit)
    # Agents run in threads that hold the GIL for milliseconds at a time; handing it over every
    # 1 ms instead of 5 ms keeps the event loop (/healthz, new connections) answering under load.
    sys.setswitchinterval(0.001)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        # Streams and chat requests end on their own at the grace period's end; anything else
        # still running then is cancelled by uvicorn a little later.
        timeout_graceful_shutdown=stopping.grace_s + SHUTDOWN_MARGIN_S,  # type: ignore[arg-type]
    )
    return not signals.forced


class ClientGone(HTTPException):
    def __init__(self) -> None:
        # nginx's "client closed request": only the metrics and the log ever see it
        super().__init__(499, "the client closed the connection")


class ServerStopping(HTTPException):
    def __init__(self) -> None:
        super().__init__(503, SHUTTING_DOWN, headers={"Retry-After": "1"})


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request's body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


END = object()  # what BackgroundIterator.next returns after the last item


class BackgroundIterator:
    """The items of a blocking iterator, produced by a daemon thread and read on the event loop.

    The thread runs ahead of the reader by at most ``buffer`` items (a slow client slows the
    producer instead of filling memory). ``stop()`` (the client went away, the server's grace
    ended) sets ``cancel``, which a PAL sandbox run watches, and closes the iterator at its next
    item; a step that blocks (a model call) finishes in the background: the thread is a daemon,
    so exiting never waits for it. Each thread holds one of ``slots`` while it runs: with none
    free, the first ``next()`` is a 503.
    """

    def __init__(
        self,
        produce: Callable[[], Iterator[Any]],
        cancel: threading.Event,
        slots: threading.Semaphore,
        buffer: int = STREAM_BUFFER,
    ) -> None:
        self.cancel = cancel
        self._produce, self._slots = produce, slots
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._room = threading.Semaphore(buffer)
        self._stopped = threading.Event()
        self._started = False
        self._loop = asyncio.get_running_loop()

    async def next(self) -> Any:
        """The next item, ``END`` after the last; the iterator's exception is raised here."""
        if not self._started:
            if not self._slots.acquire(blocking=False):
                raise HTTPException(
                    503,
                    f"the server is answering {CHAT_WORKERS} chat requests already; retry soon",
                    headers={"Retry-After": "1"},
                )
            self._started = True
            threading.Thread(target=self._run, name="agentkit-chat", daemon=True).start()
        kind, value = await self._queue.get()
        self._room.release()
        if kind == "error":
            raise value
        return END if kind == "end" else value

    def stop(self) -> None:
        self._stopped.set()
        self.cancel.set()
        self._room.release()  # a producer waiting for room wakes up and sees it is stopped

    def interrupt(self, error: BaseException) -> None:
        """Stop, and make ``next()`` raise ``error`` once what is already queued is read (on
        the event loop's thread)."""
        self.stop()
        self._queue.put_nowait(("error", error))

    @asynccontextmanager
    async def interrupted(
        self, *when: tuple[Callable[[], Awaitable[Any]], BaseException]
    ) -> AsyncIterator[None]:
        """While inside, each ``(wait, error)`` whose ``wait()`` returns interrupts with its
        error."""

        async def watch(wait: Callable[[], Awaitable[Any]], error: BaseException) -> None:
            await wait()
            self.interrupt(error)

        watchers = [asyncio.ensure_future(watch(event, error)) for event, error in when]
        try:
            yield
        finally:
            for watcher in watchers:
                watcher.cancel()

    def _run(self) -> None:
        try:
            items = self._produce()
            try:
                for item in items:
                    if not self._put("item", item):
                        return
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()  # e.g. closes the model server's stream, which aborts the request
            self._put("end", None)
        except BaseException as error:  # handed to the reader
            self._put("error", error)
        finally:
            self._slots.release()

    def _put(self, kind: str, value: Any) -> bool:
        if self._stopped.is_set():
            return False
        self._room.acquire()
        if self._stopped.is_set():
            return False
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server has stopped
            return False
        return True


ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\":]+/)+([^\s/'\":]*)")


def relative_paths(text: str, bases: Iterable[str | Path]) -> str:
    """``text`` with the server's absolute paths made relative: under one of ``bases`` (the
    index, the upload folder, the document roots) relative to it, any other one as its last
    part only."""
    for base in sorted({str(b).rstrip("/") for b in bases if str(b).startswith("/")}, key=len)[
        ::-1
    ]:
        text = text.replace(base + "/", "").replace(base, ".")
    return ABSOLUTE_PATH.sub(lambda m: m.group(1), text)


def create_app(
    model: ChatModel,
    index: Index | None = None,
    *,
    feedback: FeedbackStore | None = None,
    config: ApiConfig | None = None,
    sandbox: Sandbox | None = None,
    conversations: ConversationStore | None = None,
    settings: Settings | None = None,
) -> FastAPI:
    """The API over ``model`` and ``index``; ``settings`` (default: read now) configure the
    agents, e.g. ``AGENTKIT_RAG_*``; ``config`` the API itself."""
    from agentkit.settings import get_settings

    config = config or ApiConfig()
    settings = settings or get_settings()
    metrics = Metrics()
    protect_docs = bool(config.keys) if config.protect_docs is None else config.protect_docs
    # FastAPI's own /docs, /redoc and /openapi.json are replaced by routes below that can ask
    # for a key.
    stopping = Shutdown(config.shutdown_grace_s)
    chat_slots = threading.BoundedSemaphore(CHAT_WORKERS)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        signals: SignalHandling | None = getattr(app.state, "signals", None)
        if signals is not None:  # served by serve(): its signal handling replaces uvicorn's
            signals.take_over()
        yield
        for thread in jobs.running():  # let running jobs end, within the grace period if any
            await asyncio.to_thread(thread.join, stopping.seconds_left(JOB_SHUTDOWN_WAIT_S))

    app = FastAPI(
        title="agentkit",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.model, app.state.index, app.state.metrics = model, index, metrics
    app.state.shutdown = stopping
    limiter = RateLimiter(config.rate_limit_per_minute)
    box = sandbox or Sandbox()
    jobs = JobRunner(report=lambda text: relative(text))
    upload_root = Path(config.upload_dir).resolve() if config.upload_dir else None
    uploads: UploadOwners | None = None
    upload_lock = threading.Lock()  # upload checks and writes, and deletes of uploaded files
    if upload_root is not None:
        upload_root.mkdir(parents=True, exist_ok=True)
        uploads = UploadOwners(upload_root)
    document_roots = [Path(r).resolve() for r in config.document_roots]
    server_paths = [
        *([index.path] if index is not None else []),
        *([upload_root] if upload_root else []),
        *document_roots,
        *config.document_roots,
    ]

    def relative(text: str) -> str:
        return relative_paths(text, server_paths)

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(SecurityHeaders)  # last added: outermost, so it sees every response

    def authorize(request: Request) -> Caller:
        if not config.keys:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        token = (header[7:] if header.lower().startswith("bearer ") else "").encode()
        found = None
        for entry in config.keys:  # every key is compared, so timing tells nothing
            if hmac.compare_digest(token, entry.key.encode()):
                found = entry
        if found is None:
            raise HTTPException(401, "missing or invalid API key: send Authorization: Bearer KEY")
        if not limiter.allow(found.name):
            raise HTTPException(429, "rate limit reached for this API key; retry in a minute")
        return Caller(found.name, found.role)

    app.state.authorize, app.state.protect_docs = authorize, protect_docs

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        status = error.status_code
        message = str(error.detail)
        if status == 405:  # Starlette's routing says which methods the path has: Allow
            allowed = (error.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed here; use {allowed or 'another path'}"
        return JSONResponse(
            error_body(message, ERROR_KINDS.get(status, "invalid_request_error"), status),
            status,
            headers=error.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse(error_body(problems[:2000], "invalid_request_error", 400), 400)

    @app.exception_handler(AgentkitError)
    async def ours(request: Request, error: AgentkitError) -> JSONResponse:
        status = error_status(error)
        return JSONResponse(error_body(relative(str(error)), type(error).__name__, status), status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette answers this one outside every middleware: the headers are added here.
        return JSONResponse(
            error_body("internal error; see the server log", "server_error", 500),
            500,
            headers=security_headers(request.url.path),
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:  # on the event loop: no wait for a pool thread
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready: no index or no model"}},
    )
    def readyz() -> JSONResponse:
        checks = {"index": index is not None}
        try:
            model.context_length()
            checks["model"] = True
        except AgentkitError:
            checks["model"] = False
        ready = all(checks.values())
        return JSONResponse({"ready": ready, **checks}, 200 if ready else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={**text_body("text/plain", "Prometheus text format"), **errors(401, 429)},
    )
    def prometheus(_: Caller = DOCS_READER) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def contract() -> dict[str, Any]:
        """The OpenAPI schema as the server behaves: invalid requests are 400s in OpenAI's
        error shape (not FastAPI's 422), and operations that need a key say so when keys are
        set."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            open_paths = {"/healthz", "/readyz"} | (set() if protect_docs else {"/metrics"})
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)  # routes document their 400
                    if config.keys and path not in open_paths:
                        operation["security"] = [{"bearer": []}]
            components = schema.setdefault("components", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(unused, None)
            if config.keys:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = contract  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_schema(_: Caller = DOCS_READER) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def swagger_page(request: Request, _: Caller = DOCS_READER) -> HTMLResponse:
        schema = request.scope.get("root_path", "").rstrip("/") + "/openapi.json"
        return get_swagger_ui_html(openapi_url=schema, title="agentkit - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    def redoc_page(request: Request, _: Caller = DOCS_READER) -> HTMLResponse:
        schema = request.scope.get("root_path", "").rstrip("/") + "/openapi.json"
        return get_redoc_html(openapi_url=schema, title="agentkit - ReDoc")

    @app.get("/v1/models", responses=errors(401, 429))
    def models(_: Caller = AUTHORIZED) -> dict[str, Any]:
        names = agent_names()
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

    @app.post("/v1/search", responses=errors(400, 401, 404, 413, 429, 503))
    def search(body: SearchRequest, _: Caller = AUTHORIZED) -> dict[str, Any]:
        if index is None:
            raise HTTPException(404, "no index is loaded: start the API with --index")
        hits = index.search(body.query, k=body.k, mode=body.mode)  # Index shares, writes wait
        return {"object": "list", "data": [h.to_dict() for h in hits]}

    @app.post("/v1/feedback", responses=errors(400, 401, 404, 413, 429))
    def add_feedback(body: RatingFeedback | RankingFeedback, caller: Caller = AUTHORIZED) -> dict:
        if feedback is None:
            raise HTTPException(404, "feedback is not enabled on this server")
        try:
            if isinstance(body, RatingFeedback):
                row = feedback.add_rating(
                    body.prompt,
                    body.completion,
                    body.rating,
                    body.labeler,
                    body.comment,
                    owner=caller.owner,
                )
            else:
                row = feedback.add_ranking(
                    body.prompt,
                    body.ranking,
                    body.labeler,
                    body.ties,
                    body.comment,
                    owner=caller.owner,
                )
        except ValueError as error:
            raise HTTPException(400, str(error)) from None
        return {"id": row, "object": "feedback"}

    @app.get(
        "/v1/feedback/export",
        response_class=Response,
        responses={
            **text_body("application/x-ndjson", "One JSON object a line"),
            **errors(400, 401, 404, 429),
        },
    )
    def export(
        format: Literal["pairwise"] = "pairwise",  # noqa: A002
        caller: Caller = AUTHORIZED,
    ) -> Response:
        """An admin exports everyone's feedback, any other key its own."""
        if feedback is None:
            raise HTTPException(404, "feedback is not enabled on this server")
        pairs = feedback.pairwise(owner=None if caller.admin else caller.name)
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        return Response(lines, media_type="application/x-ndjson")

    def need_index() -> Index:
        if index is None:
            raise HTTPException(404, "no index is loaded: start the API with --index")
        return index

    @app.post(
        "/v1/documents/folder", status_code=202, responses=errors(400, 401, 403, 404, 413, 429)
    )
    def index_server_folder(body: FolderRequest, caller: Caller = ADMIN) -> dict[str, Any]:
        target = need_index()
        if "\x00" in body.folder:
            raise HTTPException(400, "the folder name contains a NUL byte")
        folder = Path(body.folder).resolve()  # links followed: where it really is counts
        if not any(folder == r or folder.is_relative_to(r) for r in document_roots):
            raise HTTPException(
                403,
                "that folder is outside the configured document roots "
                "(AGENTKIT_API_DOCUMENT_ROOTS); give a folder inside one",
            )
        if not folder.is_dir():
            raise HTTPException(400, f"{body.folder} is not a folder")
        return jobs.start("folder", caller.owner, lambda: target.sync_folder(folder))

    @app.post(
        "/v1/documents",
        status_code=202,
        responses=errors(400, 401, 404, 409, 413, 429),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["files"],
                            "properties": {
                                "files": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {"type": "string", "format": "binary"},
                                }
                            },
                        }
                    }
                },
            }
        },
    )
    async def upload(request: Request, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        """Files of ``files`` are indexed under their names; a name another key uploaded is
        refused (admins may replace any)."""
        target = need_index()
        if upload_root is None or uploads is None:
            raise HTTPException(404, "uploads are not enabled on this server")
        from agentkit.retrievers.loaders import load_file

        try:
            form = await request.form()
        except HTTPException:
            raise  # too large (413), or a multipart error (400)
        except Exception:
            raise HTTPException(400, "send files as multipart/form-data") from None
        try:
            items = [item for item in form.getlist("files") if not isinstance(item, str)]
            names = [check_file_name(item.filename) for item in items]
            if len(set(names)) != len(names):
                raise HTTPException(400, "two files have the same name; send each name once")
            loaded = []
            for item, name in zip(items, names):
                raw = await item.read()
                try:
                    doc = load_file(upload_root / name, upload_root, raw=raw)
                except ValueError as error:  # a broken PDF, HTML the parser gives up on, …
                    raise HTTPException(
                        400, f"{relative(str(error))}; upload a file that opens"
                    ) from None
                if doc is not None:
                    loaded.append((name, raw, doc))
        finally:
            await form.close()
        if not loaded:
            raise HTTPException(400, "no indexable files (.md .txt .rst .html .pdf) in 'files'")
        with upload_lock:  # no other upload or delete between the checks and the writes
            for name, _, _ in loaded:
                exists = existing_upload(upload_root, name)  # 400 for a link
                if exists and not caller.admin and uploads.owner_of(name) != caller.owner:
                    raise HTTPException(
                        409,
                        f"a document named {name} was uploaded with another API key; "
                        "upload yours under another name",
                    )
            for name, raw, _ in loaded:
                write_upload(upload_root, name, raw)
                uploads.set(name, caller.owner)
        docs = [doc for _, _, doc in loaded]
        return jobs.start("upload", caller.owner, lambda: target.add_documents(docs))

    @app.get("/v1/documents/jobs/{job_id}", responses=errors(401, 404, 429))
    def job_status(job_id: str, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        job = jobs.get(job_id)
        if job is None or not (caller.admin or job["owner"] == caller.owner):
            raise HTTPException(404, f"no job {job_id} for this API key")
        return job

    @app.delete("/v1/documents/{source:path}", responses=errors(401, 404, 409, 429))
    def delete_document(source: str, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        """Admins delete any document; other keys only the uploads they made. Deleting an
        upload also deletes its file."""
        target = need_index()
        upload_name = uploads is not None and check_upload_name(source)
        owner = uploads.owner_of(source) if upload_name and uploads is not None else None
        if not caller.admin and (owner is None or owner != caller.owner):
            raise HTTPException(404, f"no document {source!r} uploaded with this API key")
        roots = target.roots_of(source)
        if not caller.admin and roots - {str(upload_root)}:
            raise HTTPException(
                409,
                f"{source!r} also names a document that was not uploaded; "
                "ask an admin to delete it",
            )
        # a user key removes only its upload, whatever another writer added since the check
        removed = target.remove_source(source, root=None if caller.admin else str(upload_root))
        if upload_name and upload_root and uploads and str(upload_root) in roots:
            with upload_lock:
                try:
                    os.unlink(upload_root / source)  # the link or file itself, never its target
                except FileNotFoundError:
                    pass
                uploads.set(source, None)
        if not removed:
            raise HTTPException(404, f"no document with source {source!r}")
        return {"deleted": source, "documents": removed}

    context = AgentContext(model, settings, index=index, sandbox=box)
    from agentkit.services.web import web_router  # the page at / and the routes it adds

    app.include_router(
        web_router(context, config=config, feedback=feedback, conversations=conversations)
    )

    def served_model() -> str | None:
        """The name of the model passed through to, when the model says it (a server does)."""
        name = getattr(model, "model", None)
        return name if isinstance(name, str) else None

    class ChatTurn:
        """One chat request: its checks and its agent's run happen in a worker thread
        (``completion`` or ``events``), its SSE framing on the event loop (``sse``)."""

        def __init__(self, body: ChatRequest, caller: Caller) -> None:
            self.body, self.caller = body, caller
            self.agent = get_agent(body.model)
            self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            self.created = int(time.time())
            self.usage = Usage()  # a stream's, added up as the model reports it
            self.cancel = threading.Event()  # set when the client goes away or time is up

        def prepare(self) -> tuple[AgentRequest, Callable[[str], None] | None]:
            """The checks that need the model or the stores (the model's name, the
            conversation, the context), then the agent's request and what remembers the reply
            once the client has it."""
            body = self.body
            passes_through = self.agent is PASS_THROUGH
            if passes_through and (served := served_model()) not in (None, body.model):
                names = ", ".join((*agent_names(), served))
                raise HTTPException(404, f"no model {body.model!r} here; use one of {names}")
            new_messages = [m.model_dump() for m in body.messages]
            messages, remember = new_messages, None
            if body.conversation_id and conversations is not None:
                # Another key's conversation is ConversationNotFound (404), for admins too: a
                # conversation is private to the key that started it.
                owner, conversation = self.caller.owner, body.conversation_id
                history = conversations.history(conversation, owner=owner)
                messages = trim_to_budget(model, history, new_messages, body.max_tokens or 256)

                def remember(text: str) -> None:
                    if not self.cancel.is_set():
                        reply = {"role": "assistant", "content": text}
                        conversations.append(conversation, [*new_messages, reply], owner=owner)

            request = AgentRequest(
                messages,  # type: ignore[arg-type]
                max_tokens=body.max_tokens,
                temperature=body.temperature,
                stop=stops(body.stop),
                n=body.n,
                cancel=self.cancel,
            )
            if passes_through:
                check_context(model, messages, body.max_tokens)
            elif self.agent.name == "agentkit-pal":
                from agentkit.pal import PAL

                pal = PAL(model, box)
                prompt = load_messages(pal.prompt, question=request.question)
                check_context(model, prompt, pal.max_tokens)
            return request, remember

        def completion(self) -> Iterator[dict[str, Any]]:
            """The chat.completion (one item)."""
            body = self.body
            request, remember = self.prepare()
            result = run_agent(body.model, context, request)
            count_tokens(result.usage)
            count_data(result.data)
            data = result.data
            if remember is not None:
                remember(result.text)
                data = {**data, "conversation_id": body.conversation_id}
            yield {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": body.model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                    for i, text in enumerate(result.texts)
                ],
                "usage": openai_usage(result.usage),
                **({"agentkit": data} if data else {}),
            }

        def events(self) -> Iterator[AgentEvent]:
            """The agent's events; the reply is remembered once it is whole."""
            request, remember = self.prepare()
            parts: list[str] = []
            try:
                for event in stream_agent(self.body.model, context, request):
                    if event.usage is not None:
                        self.usage += event.usage
                    count_data(event.data)
                    parts.append(event.text)
                    yield event
            finally:
                count_tokens(self.usage)
            if remember is not None:
                remember("".join(parts))

        async def sse(self, first: Any, work: BackgroundIterator) -> AsyncIterator[str]:
            """OpenAI's chunk framing: a role chunk, content chunks, a finish chunk, ``[DONE]``;
            with ``stream_options.include_usage``, a chunk with no choices and the usage last.
            An error, or the end of the server's grace period, ends the stream with an error
            event and ``[DONE]``; a client that goes away stops the work."""
            options = self.body.stream_options
            frames = ChunkFrames(self.id, self.created, self.body.model)
            try:
                yield frames.chunk({"role": "assistant", "content": ""}, None)
                async with work.interrupted((stopping.ended, ServerStopping())):
                    event = first
                    while event is not END:
                        if event.text or event.data:
                            delta = {"content": event.text} if event.text else {}
                            yield frames.chunk(delta, None, event.data)
                        event = await work.next()
                yield frames.chunk({}, "stop")
                if options is not None and options.include_usage:
                    yield frames.frame(choices=[], usage=openai_usage(self.usage))
            except Exception as error:  # the response has started: its status is sent
                yield error_event(error, relative)
            finally:
                work.stop()
            yield f"data: {DONE}\n\n"

    @app.post(
        "/v1/chat/completions",
        responses={
            200: {
                "description": "A chat completion, or with `stream: true` server-sent events in "
                "OpenAI's chunk format, ending with `data: [DONE]`. An error after the first "
                'event arrives as an event `{"error": {...}}`, then `data: [DONE]`.',
                "content": {"text/event-stream": {"schema": SSE_EVENT}},
            },
            **errors(400, 401, 404, 413, 429, 502, 503),
        },
    )
    async def chat(body: ChatRequest, request: Request, caller: Caller = AUTHORIZED) -> Any:
        """Whatever the request would be refused for is refused before a stream starts, with
        the status the same request gets unstreamed."""
        turn = ChatTurn(body, caller)
        question = next((m.content for m in reversed(body.messages) if m.role == "user"), "")
        if turn.agent is not PASS_THROUGH and not question.strip():
            raise HTTPException(400, "messages must include a user message with the question")
        if turn.agent.needs_index and index is None:
            raise HTTPException(400, f"{body.model} needs an index: start the API with --index")
        if stopping.started:
            raise ServerStopping()
        work = BackgroundIterator(
            turn.events if body.stream else turn.completion, turn.cancel, chat_slots
        )
        # Until the first event, the request can still fail with an HTTP status: by then the
        # model's name, the conversation, the context budget and the retrieval are checked.
        async with work.interrupted(
            (partial(disconnected, request.receive), ClientGone()),
            (stopping.ended, ServerStopping()),
        ):
            first = await work.next()
        if not body.stream:
            return first
        return StreamingResponse(
            turn.sse(first, work),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def count_tokens(usage: Usage) -> None:
        metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        metrics.tokens.labels("completion").inc(usage.completion_tokens)

    def count_data(data: dict[str, Any] | None) -> None:
        """The agents' own metrics, from a result's or an event's data."""
        if not data:
            return
        if "step" in data:  # a streamed ReAct step
            metrics.steps.inc()
        if "react" in data:
            metrics.steps.inc(len(data["react"].get("steps", [])))
        if "pal" in data:
            metrics.sandbox.labels(data["pal"].get("error_type") or "ok").inc()

    return app


def check_context(model: ChatModel, messages: list[dict[str, str]], max_tokens: int | None) -> None:
    """ContextBudgetError (a 400) when ``messages`` and ``max_tokens`` more (at least one)
    cannot fit the model's context; the server would refuse them too, after the stream began."""
    context = model.context_length()
    room = max_tokens or 1
    if token_upper_bound(messages) + room <= context:  # no round trip to count them
        return
    used = model.count_tokens(messages)
    if used + room > context:
        asked = f" and max_tokens asks for {max_tokens} more" if max_tokens else ""
        raise ContextBudgetError(
            f"the messages take {used} of the model's {context} tokens of context{asked}: "
            "shorten them, ask for fewer tokens, or serve the model with a larger --max-model-len"
        )


def openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def stops(stop: str | list[str] | None) -> list[str] | None:
    return [stop] if isinstance(stop, str) else stop


def error_status(error: AgentkitError) -> int:
    """The HTTP status an error of ours answers."""
    if isinstance(error, (InvalidQueryError, ContextBudgetError, ToolError, InvalidPathError)):
        return 400
    if isinstance(error, ConversationNotFound):
        return 404
    if isinstance(error, LLMError):
        return 502  # the model server refused the request
    return 503  # the model server is down or unusable


ERROR_KINDS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def error_event(error: Exception, relative: Callable[[str], str]) -> str:
    """An error inside a stream, as OpenAI sends it: ``data: {"error": {...}}``."""
    if isinstance(error, HTTPException):
        status, message = error.status_code, str(error.detail)
        body = error_body(message, ERROR_KINDS.get(status, "invalid_request_error"), status)
    elif isinstance(error, AgentkitError):
        status = error_status(error)
        body = error_body(relative(str(error)), type(error).__name__, status)
    else:
        logger.error("a chat stream failed", exc_info=error)
        body = error_body("internal error; see the server log", "server_error", 500)
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


@dataclass
class ChunkFrames:
    """``chat.completion.chunk`` events of one completion."""

    id: str
    created: int
    model: str

    def frame(self, **fields: Any) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            **fields,
        }
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def chunk(self, delta: dict[str, Any], finish: str | None, extra: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self.frame(choices=[choice], **({"agentkit": extra} if extra else {}))
