"""The chat REST API (FastAPI): OpenAI-compatible chat completions over the agents.

``model`` picks the agent: ``agentkit-rag``, ``agentkit-pal``, ``agentkit-react``; any other
name passes through to the served model. Streaming is SSE in OpenAI's format, so the official
``openai`` client works unchanged; citations, PAL programs and ReAct steps ride along as an
extra ``agentkit`` field that such clients ignore.

Trust boundaries: every request is made by a caller (an API key's name and role, see
``agentkit.services.auth``); conversations, feedback, jobs and uploads record it, and other keys
get 404 for them. Admins also manage documents and export everyone's feedback. Bodies are
counted as they arrive (chunked ones too), uploads never write through a link, and responses
carry security headers and no absolute server paths.

This module assembles the app: its state (``ApiState``), middleware, error handlers and the
routers of ``agentkit.services.routes`` (chat, documents, feedback, meta) and of the web page.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from agentkit.agents import AgentContext
from agentkit.errors import AgentkitError
from agentkit.guardrails import Guardrails
from agentkit.llm import ChatModel
from agentkit.retrievers import Index
from agentkit.retrievers.uploads import UploadOwners
from agentkit.services.api_state import ApiConfig, ApiState, relative_paths
from agentkit.services.auth import ApiKey, Caller, key_checker, parse_api_keys
from agentkit.services.conversations import ConversationStore
from agentkit.services.feedback import FeedbackStore
from agentkit.services.jobs import JobRunner
from agentkit.services.lifecycle import Shutdown, SignalHandling, serve
from agentkit.services.metrics import Metrics, RequestMetrics
from agentkit.services.middleware import BodyLimit, SecurityHeaders, security_headers
from agentkit.services.ratelimit import RateLimiter
from agentkit.services.routes.chat import chat_router
from agentkit.services.routes.documents import documents_router
from agentkit.services.routes.feedback import feedback_router
from agentkit.services.routes.mcp import mcp_router
from agentkit.services.routes.meta import meta_router
from agentkit.services.schemas import ERROR_KINDS, error_body, error_status
from agentkit.services.shared_state import SharedState
from agentkit.services.trace_context import TraceContext
from agentkit.tools.sandbox import Sandbox

if TYPE_CHECKING:
    from agentkit.settings import Settings

__all__ = [
    "ApiConfig", "ApiKey", "ApiState", "Caller", "JobRunner", "RateLimiter", "create_app",
    "parse_api_keys", "relative_paths", "serve",
]  # fmt: skip

JOB_SHUTDOWN_WAIT_S = 120  # on shutdown, how long each running indexing job is waited for


def create_app(
    model: ChatModel,
    index: Index | None = None,
    *,
    feedback: FeedbackStore | None = None,
    config: ApiConfig | None = None,
    sandbox: Sandbox | None = None,
    conversations: ConversationStore | None = None,
    settings: Settings | None = None,
    shared: SharedState | None = None,
) -> FastAPI:
    """The API over ``model`` and ``index``; ``settings`` (default: read now) configure the
    agents, e.g. ``AGENTKIT_RAG_*``; ``config`` the API itself; ``shared``: the keys, jobs,
    rate-limit counts and upload owners kept in the database (workers and replicas)."""

    config = config or ApiConfig()
    shared = shared or SharedState()
    state = build_state(model, index, feedback, config, sandbox, conversations, settings, shared)
    stopping = state.stopping

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        signals: SignalHandling | None = getattr(app.state, "signals", None)
        if signals is not None:  # served by serve(): its signal handling replaces uvicorn's
            signals.take_over()
        yield
        for thread in state.jobs.running():  # let running jobs end, within the grace period
            await asyncio.to_thread(thread.join, stopping.seconds_left(JOB_SHUTDOWN_WAIT_S))

    # FastAPI's own /docs, /redoc and /openapi.json are replaced by routes that can ask for a key.
    app = FastAPI(
        title="agentkit",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.api = state
    app.state.model, app.state.index, app.state.metrics = model, index, state.metrics
    app.state.shutdown = stopping
    app.state.authorize = key_checker(
        config.keys,
        shared.limiter or RateLimiter(config.rate_limit_per_minute),
        shared.keys,
        in_database=shared.limiter is not None and shared.limiter.per_minute > 0,
    )
    app.state.protect_docs = protect_docs(config, shared)

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    app.add_middleware(TraceContext)  # traceparent in and out (with OTEL_EXPORTER_OTLP_*)
    app.add_middleware(SecurityHeaders)  # last added: outermost, so it sees every response
    add_error_handlers(app, state)

    app.openapi = lambda: contract(app, config)  # type: ignore[method-assign]
    for router in (meta_router, chat_router, documents_router, feedback_router, mcp_router):
        app.include_router(router(state))
    from agentkit.services.web import web_router  # the page at / and the routes it adds

    app.include_router(
        web_router(
            state.context,
            config=config,
            feedback=feedback,
            conversations=conversations,
            uploads=state.uploads,
        )
    )
    return app


def build_state(
    model: ChatModel,
    index: Index | None,
    feedback: FeedbackStore | None,
    config: ApiConfig,
    sandbox: Sandbox | None,
    conversations: ConversationStore | None,
    settings: Settings | None,
    shared: SharedState,
) -> ApiState:
    from agentkit.settings import get_settings

    settings = settings or get_settings()
    context = AgentContext(model, settings, index=index, sandbox=sandbox or Sandbox())
    context.guardrails = Guardrails.from_settings(settings, model)  # AGENTKIT_GUARD*, _REVISE
    upload_root = Path(config.upload_dir).resolve() if config.upload_dir else None
    uploads = None
    if upload_root is not None:
        upload_root.mkdir(parents=True, exist_ok=True)
        uploads = shared.uploads or UploadOwners(upload_root)
    document_roots = [Path(r).resolve() for r in config.document_roots]
    state = ApiState(
        config=config,
        settings=settings,
        context=context,
        metrics=Metrics(),
        stopping=Shutdown(config.shutdown_grace_s),
        jobs=JobRunner(store=shared.jobs),
        feedback=feedback,
        conversations=conversations,
        upload_root=upload_root,
        uploads=uploads,
        document_roots=document_roots,
        server_paths=[
            *([index.path] if index is not None else []),
            *([upload_root] if upload_root else []),
            *document_roots,
            *config.document_roots,
        ],
    )
    state.jobs.report = state.relative
    return state


def protect_docs(config: ApiConfig, shared: SharedState | None = None) -> bool:
    """Whether /metrics and the API's docs need a key: as configured, else when keys are set
    (in settings, or in the database as the app starts)."""
    if config.protect_docs is not None:
        return config.protect_docs
    return bool(config.keys) or bool(shared and shared.keys and shared.keys.any_active())


def add_error_handlers(app: FastAPI, state: ApiState) -> None:
    """Every error in OpenAI's shape, with no absolute server path in it."""

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
        body = error_body(state.relative(str(error)), type(error).__name__, status)
        return JSONResponse(body, status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette answers this one outside every middleware: the headers are added here.
        return JSONResponse(
            error_body("internal error; see the server log", "server_error", 500),
            500,
            headers=security_headers(request.url.path),
        )


def contract(app: FastAPI, config: ApiConfig) -> dict[str, Any]:
    """The OpenAPI schema as the server behaves: invalid requests are 400s in OpenAI's error
    shape (not FastAPI's 422), and operations that need a key say so when keys are set."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        open_paths = {"/healthz", "/readyz"} | (set() if protect_docs(config) else {"/metrics"})
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
