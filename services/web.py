"""The web page of ``agentkit serve``: chat, feedback, labeling workbench, documents.

The page is plain HTML, JavaScript modules and CSS from ``services/web/`` (package data, no
build step). ``/`` serves ``index.html`` (never cached: it names the assets); the assets are
served under ``/assets/HASH/NAME``, where HASH is a hash of every asset's content, with a year
of ``immutable`` caching: a new version of any file is a new URL, and modules importing
``./chat.js`` resolve within the same version. Nothing comes from another origin; the page's
``Content-Security-Policy`` is ``default-src 'self'`` (set by the API's security headers).

Besides the page, the routers here add what it needs and the REST API lacked: the caller
(``/v1/whoami``), conversations (list, read, delete), the documents of the index and its stats
(``/v1/index/...``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

from agentkit.agents import AgentContext
from agentkit.retrievers.uploads import UploadOwners
from agentkit.services.api_state import ApiConfig
from agentkit.services.auth import AUTHORIZED, Caller
from agentkit.services.conversations import ConversationNotFound, ConversationStore
from agentkit.services.feedback import FeedbackStore
from agentkit.services.labeling import LabelingStore, labeling_router
from agentkit.services.schemas import errors

ASSETS = Path(__file__).parent / "web"
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
IMMUTABLE = "public, max-age=31536000, immutable"


class PageAssets:
    """The page's files, read once, and the version (content hash) they are served under."""

    def __init__(self, folder: Path = ASSETS) -> None:
        self.files = {
            p.name: p.read_bytes()
            for p in sorted(folder.iterdir())
            if p.suffix in MEDIA_TYPES and p.is_file()
        }
        digest = hashlib.sha256()
        for name, content in self.files.items():
            digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
        self.version = digest.hexdigest()[:16]
        shell = (folder / "index.html").read_text("utf-8")
        self.page = shell.replace("__ASSETS__", f"assets/{self.version}")

    @property
    def weight(self) -> int:
        """Bytes of HTML, JavaScript, CSS and icons a cold load fetches (uncompressed)."""
        return len(self.page.encode()) + sum(len(c) for c in self.files.values())


def page_router(assets: PageAssets) -> APIRouter:
    """``/`` and ``/assets/VERSION/NAME``; open to all (the page asks for a key itself)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def page() -> HTMLResponse:
        return HTMLResponse(assets.page, headers={"Cache-Control": "no-cache"})

    @router.get("/assets/{version}/{name}")
    def asset(version: str, name: str) -> Response:
        content = assets.files.get(name)
        if version != assets.version or content is None:
            raise HTTPException(404, "no such asset in this version of the page; reload it")
        media_type = MEDIA_TYPES[Path(name).suffix]
        return Response(content, media_type=media_type, headers={"Cache-Control": IMMUTABLE})

    return router


def conversations_router(conversations: ConversationStore | None) -> APIRouter:
    """``/v1/conversations``: the caller's own conversations (private to the key, admins
    included, as in chat)."""
    router = APIRouter(prefix="/v1/conversations", tags=["conversations"])

    def store() -> ConversationStore:
        if conversations is None:
            raise HTTPException(404, "conversations are not kept on this server")
        return conversations

    @router.get("", responses=errors(401, 404, 429))
    def list_conversations(caller: Caller = AUTHORIZED) -> dict[str, Any]:
        return {"object": "list", "data": store().summaries(caller.owner)}

    @router.get("/{conversation_id}", responses=errors(401, 404, 429))
    def read_conversation(conversation_id: str, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        kept = store()
        if kept.owner_of(conversation_id) != caller.owner or not (
            messages := kept.transcript(conversation_id, owner=caller.owner)
        ):
            raise ConversationNotFound(conversation_id)
        return {"id": conversation_id, "messages": messages}

    @router.delete("/{conversation_id}", responses=errors(401, 404, 429))
    def delete_conversation(conversation_id: str, caller: Caller = AUTHORIZED) -> dict[str, str]:
        store().delete(conversation_id, caller.owner)
        return {"deleted": conversation_id}

    allow_only(router, "/{conversation_id}", "GET", "DELETE")
    return router


def allow_only(router: APIRouter, path: str, *methods: str) -> None:
    """Answer the methods ``path`` lacks with a 405 naming every method it has.

    Starlette answers such a method from the first route of the path, so where each method is
    a route of its own the ``Allow`` it sends would name only that route's method."""
    allowed = ", ".join(methods)

    def refuse() -> None:
        raise HTTPException(405, headers={"Allow": allowed})

    others = [m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")]
    router.add_api_route(
        path, refuse, methods=[m for m in others if m not in methods], include_in_schema=False
    )


def documents_router(
    index: Any, config: ApiConfig, uploads: UploadOwners | None = None
) -> APIRouter:
    """``GET /v1/index/documents`` (what the index holds; which of it the caller may delete)
    and ``GET /v1/index/stats``. Paths are shown relative to their root, never absolute."""
    router = APIRouter(prefix="/v1/index", tags=["documents"])
    upload_root = str(Path(config.upload_dir).resolve()) if config.upload_dir else None

    def need_index() -> Any:
        if index is None:
            raise HTTPException(404, "no index is loaded: start the API with --index")
        return index

    @router.get("/documents", responses=errors(401, 404, 429))
    def list_documents(caller: Caller = AUTHORIZED) -> dict[str, Any]:
        documents = []
        for document in need_index().documents():
            root = document.pop("root")
            uploaded = root == upload_root
            owner = uploads.owner_of(document["source"]) if uploads and uploaded else None
            documents.append(
                {
                    **document,
                    "uploaded": uploaded,
                    "deletable": caller.admin or (uploaded and owner == caller.owner),
                }
            )
        return {"object": "list", "data": documents}

    @router.get("/stats", responses=errors(401, 404, 429))
    def stats(caller: Caller = AUTHORIZED) -> dict[str, Any]:
        found = need_index().stats()
        found["path"] = Path(found["path"]).name
        found["uploads"] = upload_root is not None
        found["folders"] = bool(config.document_roots) and caller.admin
        if caller.admin:
            found["document_roots"] = list(config.document_roots)
        return found

    return router


def web_router(
    context: AgentContext,
    *,
    config: ApiConfig,
    feedback: FeedbackStore | None = None,
    conversations: ConversationStore | None = None,
    uploads: UploadOwners | None = None,
    assets: PageAssets | None = None,
) -> APIRouter:
    """Everything the web page adds to the API (``create_app`` includes it)."""
    router = APIRouter()
    router.include_router(page_router(assets or PageAssets()))

    @router.get("/v1/whoami", tags=["web"], responses=errors(401, 429))
    def whoami(caller: Caller = AUTHORIZED) -> dict[str, Any]:
        """The caller's key name and role (``anonymous`` admin when the API has no keys)."""
        return {"name": caller.name, "role": caller.role, "keys": bool(config.keys)}

    router.include_router(conversations_router(conversations))
    router.include_router(documents_router(context.index, config, uploads))
    if feedback is not None:
        router.include_router(labeling_router(LabelingStore(feedback), context))
        allow_only(router, "/v1/labeling/tasks", "GET", "POST")
        allow_only(router, "/v1/labeling/tasks/{task_id}", "GET", "DELETE")
    return router
