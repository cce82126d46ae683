"""The API's Prometheus metrics and the middleware that counts requests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from agentkit.llm import Usage

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
        self.guard_actions = Counter(
            "agentkit_guardrail_actions", "Guarded requests by outcome", ["action"], registry=r
        )
        self.guard_verdicts = Counter(
            "agentkit_guard_verdicts", "Guard verdicts", ["stage", "verdict"], registry=r
        )

    def count_tokens(self, usage: Usage) -> None:
        self.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.tokens.labels("completion").inc(usage.completion_tokens)

    def count_data(self, data: dict[str, Any] | None) -> None:
        """The agents' own metrics, from a result's or an event's data."""
        if not data:
            return
        if "step" in data:  # a streamed ReAct step
            self.steps.inc()
        if "react" in data:
            self.steps.inc(len(data["react"].get("steps", [])))
        if "pal" in data:
            self.sandbox.labels(data["pal"].get("error_type") or "ok").inc()
        if "guardrails" in data:  # flagged, blocked and revised answers are counted here
            rails = data["guardrails"]
            self.guard_actions.labels(rails.get("action", "passed")).inc()
            for verdict in rails.get("verdicts", []):
                said = "error" if verdict.get("error") else "safe" if verdict["safe"] else "unsafe"
                self.guard_verdicts.labels(verdict["stage"], said).inc()


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
