"""ASGI middleware of the API: security headers on every response and a limit on body size."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from agentkit.services.schemas import error_body

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
