"""The index over HTTP: search it, add a server folder or uploaded files (as background jobs),
follow a job, delete a document."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException

from agentkit.retrievers import Index
from agentkit.retrievers.roots import folder_in_roots
from agentkit.retrievers.uploads import (
    check_file_name,
    check_upload_name,
    existing_upload,
    write_upload,
)
from agentkit.services.api_state import ApiState
from agentkit.services.auth import ADMIN, AUTHORIZED, Caller
from agentkit.services.schemas import FolderRequest, SearchRequest, errors

UPLOAD_BODY = {
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
}


def documents_router(state: ApiState) -> APIRouter:
    router = APIRouter()
    jobs = state.jobs

    def need_index() -> Index:
        if state.index is None:
            raise HTTPException(404, "no index is loaded: start the API with --index")
        return state.index

    @router.post("/v1/search", responses=errors(400, 401, 404, 413, 429, 503))
    def search(body: SearchRequest, _: Caller = AUTHORIZED) -> dict[str, Any]:
        hits = need_index().search(body.query, k=body.k, mode=body.mode)  # shares; writes wait
        return {"object": "list", "data": [h.to_dict() for h in hits]}

    @router.post(
        "/v1/documents/folder", status_code=202, responses=errors(400, 401, 403, 404, 413, 429)
    )
    def index_server_folder(body: FolderRequest, caller: Caller = ADMIN) -> dict[str, Any]:
        target = need_index()
        folder = folder_in_roots(body.folder, state.document_roots)
        return jobs.start(
            "folder", caller.owner, lambda progress: target.sync_folder(folder, progress=progress)
        )

    @router.post(
        "/v1/documents",
        status_code=202,
        responses=errors(400, 401, 404, 409, 413, 429),
        openapi_extra=UPLOAD_BODY,
    )
    async def upload(request: Request, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        """Files of ``files`` are indexed under their names; a name another key uploaded is
        refused (admins may replace any)."""
        target = need_index()
        upload_root, uploads = state.upload_root, state.uploads
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
                        400, f"{state.relative(str(error))}; upload a file that opens"
                    ) from None
                if doc is not None:
                    loaded.append((name, raw, doc))
        finally:
            await form.close()
        if not loaded:
            raise HTTPException(400, "no indexable files (.md .txt .rst .html .pdf) in 'files'")
        with state.upload_lock:  # no other upload or delete between the checks and the writes
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
        return jobs.start("upload", caller.owner, lambda _: target.add_documents(docs))

    @router.get("/v1/documents/jobs/{job_id}", responses=errors(401, 404, 429))
    def job_status(job_id: str, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        job = jobs.get(job_id)
        if job is None or not (caller.admin or job["owner"] == caller.owner):
            raise HTTPException(404, f"no job {job_id} for this API key")
        return job

    @router.delete("/v1/documents/{source:path}", responses=errors(401, 404, 409, 429))
    def delete_document(source: str, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        """Admins delete any document; other keys only the uploads they made. Deleting an
        upload also deletes its file."""
        target = need_index()
        upload_root, uploads = state.upload_root, state.uploads
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
            with state.upload_lock:
                try:
                    os.unlink(upload_root / source)  # the link or file itself, never its target
                except FileNotFoundError:
                    pass
                uploads.set(source, None)
        if not removed:
            raise HTTPException(404, f"no document with source {source!r}")
        return {"deleted": source, "documents": removed}

    return router
