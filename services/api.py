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
import os
import re
import stat
import threading
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from agentkit.errors import (
    AgentkitError,
    ConfigError,
    ContextBudgetError,
    InvalidQueryError,
    LLMError,
    ToolError,
)
from agentkit.llm import ChatModel, Usage
from agentkit.rag import RAG, Answer
from agentkit.retrievers import Index
from agentkit.services.conversations import (
    ConversationNotFound,
    ConversationStore,
    trim_to_budget,
)
from agentkit.services.feedback import FeedbackStore
from agentkit.tools.sandbox import Sandbox

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from agentkit.settings import Settings

AGENTS = ("agentkit-rag", "agentkit-pal", "agentkit-react")
ROLES = ("admin", "user")
JOB_SHUTDOWN_WAIT_S = 120  # on shutdown, how long each running indexing job is waited for


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


def current_caller(request: Request) -> Caller:
    """The caller making ``request`` (a FastAPI dependency): 401 without a valid key, 429 over
    the rate limit."""
    return request.app.state.authorize(request)


AUTHORIZED = Depends(current_caller)


def current_admin(caller: Caller = AUTHORIZED) -> Caller:
    """The caller, when it is an admin; else 403."""
    if not caller.admin:
        raise HTTPException(
            403, f"this needs an admin API key; the key {caller.name!r} has the role user"
        )
    return caller


def docs_reader(request: Request) -> Caller:
    """The caller of /metrics and the API's docs: any key when they are protected, else anyone."""
    return current_caller(request) if request.app.state.protect_docs else ANONYMOUS


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
PAGE_CSP = {"/docs": DOCS_CSP, "/redoc": DOCS_CSP}


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


BIDI_CONTROLS = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))} | {
    "\u200e",
    "\u200f",
    "\u061c",
}


def check_file_name(name: str | None) -> str:
    """``name`` when it is safe to store as one file of the upload folder; else a 400 that says
    what is wrong with it."""

    def refuse(problem: str) -> HTTPException:
        return HTTPException(400, f"bad file name {shown!r}: {problem}; rename the file")

    shown = (name or "")[:80] + ("…" if len(name or "") > 80 else "")
    if not name or not name.strip():
        raise refuse("it is empty")
    if "\x00" in name:
        raise refuse("it contains a NUL byte")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise refuse("it is longer than 255 bytes")
    if "/" in name or "\\" in name:
        raise refuse("it contains a path separator ('/' or '\\'); send the name only")
    if any(c in BIDI_CONTROLS for c in name):
        raise refuse("it contains a bidirectional-text control character")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise refuse("it contains a control character")
    if name.startswith("."):
        raise refuse("it starts with '.' (hidden files and '..' are not accepted)")
    if name != name.strip():
        raise refuse("it starts or ends with white space")
    return name


def check_upload_name(name: str) -> bool:
    """Whether ``name`` could be the name of an uploaded file."""
    try:
        check_file_name(name)
    except HTTPException:
        return False
    return True


def existing_upload(folder: Path | int, name: str) -> bool:
    """Whether ``name`` exists in the upload folder (a path, or an open folder's descriptor);
    400 when it is a link or anything but a regular file, which uploads never replace."""
    try:
        if isinstance(folder, int):
            found = os.stat(name, dir_fd=folder, follow_symlinks=False)
        else:
            found = os.lstat(folder / name)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(found.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(found.st_mode) else "not a regular file"
        raise HTTPException(
            400,
            f"{name} in the upload folder is {kind}; upload under another name "
            "or ask the server's operator to remove it",
        )
    return True


def write_upload(folder: Path, name: str, raw: bytes) -> None:
    """Store ``raw`` as ``folder/name`` without ever writing through a link: the bytes go to a
    new temporary file (O_EXCL, O_NOFOLLOW) that is renamed over ``name``; a ``name`` that is a
    link or not a regular file is refused with a 400."""
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        existing_upload(directory, name)
        temp = f".upload-{uuid.uuid4().hex}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(temp, flags | getattr(os, "O_CLOEXEC", 0), 0o644, dir_fd=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(raw)
            os.replace(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=directory)
            except FileNotFoundError:
                pass
            raise
    finally:
        os.close(directory)


class UploadOwners:
    """Which key uploaded each file of the upload folder, kept beside the files in
    ``.owners.json`` (a name uploads can never have). Files without an entry belong to admins."""

    FILE = ".owners.json"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        try:
            self._owners: dict[str, str] = json.loads((folder / self.FILE).read_text("utf-8"))
        except FileNotFoundError:
            self._owners = {}
        except (ValueError, OSError) as error:
            raise ConfigError(
                f"{folder / self.FILE} cannot be read ({error}); restore it, or delete it to make "
                "every upload so far an admin's"
            ) from None

    def owner_of(self, name: str) -> str | None:
        return self._owners.get(name)

    def set(self, name: str, owner: str | None) -> None:
        with self._lock:
            if owner is None:
                self._owners.pop(name, None)
            else:
                self._owners[name] = owner
            write_upload(self.folder, self.FILE, json.dumps(self._owners).encode())


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
) -> FastAPI:
    config = config or ApiConfig()
    metrics = Metrics()
    protect_docs = bool(config.keys) if config.protect_docs is None else config.protect_docs
    # FastAPI's own /docs, /redoc and /openapi.json are replaced by routes below that can ask
    # for a key.
    job_threads: list[threading.Thread] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for thread in job_threads:  # the caller closes the index next: let running jobs end
            await asyncio.to_thread(thread.join, JOB_SHUTDOWN_WAIT_S)

    app = FastAPI(
        title="agentkit",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.model, app.state.index, app.state.metrics = model, index, metrics
    index_lock = threading.Lock()  # index writes (jobs) exclude searches; generation runs free
    shared = LockedIndex(index, index_lock) if index is not None else None
    buckets: dict[str, list[float]] = {}
    box = sandbox or Sandbox()
    jobs: dict[str, dict[str, Any]] = {}
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

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        path = request.scope.get("route").path if request.scope.get("route") else "other"
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - started)
        return response

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
        if config.rate_limit_per_minute:
            now = time.monotonic()
            recent = [t for t in buckets.get(found.name, []) if now - t < 60]
            if len(recent) >= config.rate_limit_per_minute:
                raise HTTPException(429, "rate limit reached for this API key; retry in a minute")
            buckets[found.name] = [*recent, now]
        return Caller(found.name, found.role)

    app.state.authorize, app.state.protect_docs = authorize, protect_docs

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = {
            401: "authentication_error",
            403: "permission_error",
            429: "rate_limit_error",
            404: "not_found_error",
        }
        return JSONResponse(
            error_body(
                str(error.detail),
                kind.get(error.status_code, "invalid_request_error"),
                error.status_code,
            ),
            error.status_code,
            headers=error.headers,
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
        elif isinstance(error, ConversationNotFound):
            status = 404
        elif isinstance(error, LLMError):
            status = 502  # the model server refused the request
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
    def prometheus(_: Caller = DOCS_READER) -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode())

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

    @app.get("/v1/models")
    def models(_: Caller = AUTHORIZED) -> dict[str, Any]:
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
    def search(body: SearchRequest, _: Caller = AUTHORIZED) -> dict[str, Any]:
        if index is None:
            raise HTTPException(404, "no index is loaded: start the API with --index")
        with index_lock:
            hits = index.search(body.query, k=body.k, mode=body.mode)
        return {"object": "list", "data": [h.to_dict() for h in hits]}

    @app.post("/v1/feedback")
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

    @app.get("/v1/feedback/export")
    def export(
        format: Literal["pairwise"] = "pairwise",  # noqa: A002
        caller: Caller = AUTHORIZED,
    ) -> PlainTextResponse:
        """An admin exports everyone's feedback, any other key its own."""
        if feedback is None:
            raise HTTPException(404, "feedback is not enabled on this server")
        pairs = feedback.pairwise(owner=None if caller.admin else caller.name)
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        return PlainTextResponse(lines, media_type="application/x-ndjson")

    def start_job(kind: str, caller: Caller, work: Any) -> dict[str, Any]:
        job_id = uuid.uuid4().hex[:16]
        jobs[job_id] = {
            "id": job_id,
            "kind": kind,
            "owner": caller.owner,
            "state": "running",
            "summary": None,
            "error": None,
        }

        def run() -> None:
            try:
                with index_lock:
                    summary = work().to_dict()
                summary["index"] = Path(summary["index"]).name
                summary["warnings"] = [relative(w) for w in summary["warnings"]]
                jobs[job_id].update(state="done", summary=summary)
            except Exception as error:  # the job reports it; the server stays up
                message = relative(str(error)) or type(error).__name__
                jobs[job_id].update(state="failed", error=message)

        thread = threading.Thread(target=run, name=f"index-{job_id}", daemon=True)
        job_threads[:] = [t for t in job_threads if t.is_alive()] + [thread]
        thread.start()
        return dict(jobs[job_id])

    def need_index() -> Index:
        if index is None:
            raise HTTPException(404, "no index is loaded: start the API with --index")
        return index

    @app.post("/v1/documents/folder", status_code=202)
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
        return start_job("folder", caller, lambda: target.sync_folder(folder))

    @app.post("/v1/documents", status_code=202)
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
        return start_job("upload", caller, lambda: target.add_documents(docs))

    @app.get("/v1/documents/jobs/{job_id}")
    def job_status(job_id: str, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        job = jobs.get(job_id)
        if job is None or not (caller.admin or job["owner"] == caller.owner):
            raise HTTPException(404, f"no job {job_id} for this API key")
        return dict(job)

    @app.delete("/v1/documents/{source:path}")
    def delete_document(source: str, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        """Admins delete any document; other keys only the uploads they made. Deleting an
        upload also deletes its file."""
        target = need_index()
        upload_name = uploads is not None and check_upload_name(source)
        owner = uploads.owner_of(source) if upload_name and uploads is not None else None
        if not caller.admin and (owner is None or owner != caller.owner):
            raise HTTPException(404, f"no document {source!r} uploaded with this API key")
        with index_lock:
            roots = {
                row[0]
                for row in target.store.db.execute(
                    "SELECT DISTINCT root FROM documents WHERE source = ?", (source,)
                )
            }
            if not caller.admin and roots - {str(upload_root)}:
                raise HTTPException(
                    409,
                    f"{source!r} also names a document that was not uploaded; "
                    "ask an admin to delete it",
                )
            removed = target.remove_source(source)
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

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest, caller: Caller = AUTHORIZED) -> Any:
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
            # Another key's conversation is ConversationNotFound (404), for admins too: a
            # conversation is private to the key that started it.
            history = conversations.history(body.conversation_id, owner=caller.owner)
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
                    owner=caller.owner,
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
        if on_done is not None:
            on_done("".join(parts))
    except AgentkitError as error:
        message = relative_paths(str(error), ())
        yield f"data: {json.dumps(error_body(message, type(error).__name__, 503))}\n\n"
        return
    yield chunk({}, "stop")
    if usage is not None:
        yield frame(choices=[], usage=openai_usage(usage))
    yield "data: [DONE]\n\n"
