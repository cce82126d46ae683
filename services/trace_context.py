"""ASGI middleware: W3C trace context in and out of API requests (``agentkit.tracing``).

With tracing on, each request is a server span, a child of the caller's ``traceparent`` when it
sends one; the agent's spans (and the ``traceparent`` sent on to the model server) nest under it,
and the response carries the request span's ``traceparent``. With tracing off it only passes
requests through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentkit import tracing

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


class TraceContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not tracing.enabled():
            await self.app(scope, receive, send)
            return
        incoming = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": scope["path"]}
        with (
            tracing.use_context(tracing.extract(incoming)),
            tracing.span(method, attributes, kind="server") as request_span,
        ):
            outgoing = [(k.encode(), v.encode()) for k, v in tracing.headers().items()]

            async def send_with_context(message: Message) -> None:
                if message["type"] == "http.response.start":
                    request_span.set("http.response.status_code", message["status"])
                    message = {**message, "headers": [*message.get("headers", []), *outgoing]}
                await send(message)

            try:
                await self.app(scope, receive, send_with_context)
            finally:
                route = getattr(scope.get("route"), "path", None)  # the template, once routed
                if route:
                    request_span.set("http.route", route)
                    request_span.rename(f"{method} {route}")
