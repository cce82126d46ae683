"""Routes about the server itself: liveness, readiness, metrics, the OpenAPI schema and docs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agentkit.errors import AgentkitError
from agentkit.services.api_state import ApiState
from agentkit.services.auth import DOCS_READER, Caller
from agentkit.services.schemas import Readiness, errors, text_body


def meta_router(state: ApiState) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:  # on the event loop: no wait for a pool thread
        return {"status": "ok"}

    @router.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready: no index or no model"}},
    )
    def readyz() -> JSONResponse:
        checks = {"index": state.index is not None}
        try:
            state.model.context_length()
            checks["model"] = True
        except AgentkitError:
            checks["model"] = False
        ready = all(checks.values())
        return JSONResponse({"ready": ready, **checks}, 200 if ready else 503)

    @router.get(
        "/metrics",
        response_class=Response,
        responses={**text_body("text/plain", "Prometheus text format"), **errors(401, 429)},
    )
    def prometheus(_: Caller = DOCS_READER) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/openapi.json", include_in_schema=False)
    def openapi_schema(request: Request, _: Caller = DOCS_READER) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @router.get("/docs", include_in_schema=False)
    def swagger_page(request: Request, _: Caller = DOCS_READER) -> HTMLResponse:
        schema = request.scope.get("root_path", "").rstrip("/") + "/openapi.json"
        return get_swagger_ui_html(openapi_url=schema, title="agentkit - Swagger UI")

    @router.get("/redoc", include_in_schema=False)
    def redoc_page(request: Request, _: Caller = DOCS_READER) -> HTMLResponse:
        schema = request.scope.get("root_path", "").rstrip("/") + "/openapi.json"
        return get_redoc_html(openapi_url=schema, title="agentkit - ReDoc")

    return router
