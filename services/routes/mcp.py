"""``/mcp``: agentkit's MCP server (``agentkit.services.mcp_server``) over streamable HTTP,
behind the same API keys and rate limits as the REST routes.

Stateless and with JSON responses, so any API worker can answer any request; without the MCP
SDK installed, ``/mcp`` answers 501 saying how to install it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.routing import Route

from agentkit.services.api_state import ApiState
from agentkit.services.auth import current_caller

METHODS = ["GET", "POST", "DELETE"]


class MCPEndpoint:
    """The ASGI endpoint: check the caller's key, then hand the request to the SDK's session
    manager (one per run of the app's lifespan: a manager runs once)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.manager: Any = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

        manager = StreamableHTTPSessionManager(
            app=self.server._lowlevel_server, stateless=True, json_response=True
        )
        async with manager.run():
            self.manager = manager
            try:
                yield
            finally:
                self.manager = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await current_caller(Request(scope, receive))  # 401 / 429 as everywhere else
        if self.manager is None:
            raise HTTPException(503, "the MCP endpoint is not running (the app's lifespan is not)")
        await self.manager.handle_request(scope, receive, send)


def mcp_router(state: ApiState) -> APIRouter:
    try:
        from agentkit.services.mcp_server import create_mcp_server
    except ImportError:
        router = APIRouter()

        @router.api_route("/mcp", methods=METHODS, include_in_schema=False)
        def mcp_missing() -> None:
            raise HTTPException(501, "MCP needs the MCP SDK on the server: agentkit[mcp]")

        return router

    endpoint = MCPEndpoint(create_mcp_server(state.context, state.relative))

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        async with endpoint.running():
            yield

    router = APIRouter(lifespan=lifespan)
    router.routes.append(Route("/mcp", endpoint, methods=METHODS))
    return router
