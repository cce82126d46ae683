"""Human feedback: ratings and rankings in, pairwise preferences out."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from agentkit.services.api_state import ApiState
from agentkit.services.auth import AUTHORIZED, Caller
from agentkit.services.feedback import AI_LABELER, FeedbackStore
from agentkit.services.schemas import RankingFeedback, RatingFeedback, errors, text_body

WRITERS = 8  # threads that write feedback


def feedback_router(state: ApiState) -> APIRouter:
    router = APIRouter()

    def store() -> FeedbackStore:
        if state.feedback is None:
            raise HTTPException(404, "feedback is not enabled on this server")
        return state.feedback

    # A few threads write feedback: requests wait for their row on the event loop, not in a
    # pool thread each, and the store's group commit puts the rows of 8 writers in one
    # transaction (64 concurrent clients on 2 cores: p99 144-626 ms with one writer thread,
    # 96-100 ms with 8).
    writer = ThreadPoolExecutor(WRITERS, thread_name_prefix="agentkit-feedback")

    def write(feedback: FeedbackStore, body: RatingFeedback | RankingFeedback, owner: Any) -> int:
        if isinstance(body, RatingFeedback):
            return feedback.add_rating(
                body.prompt, body.completion, body.rating, body.labeler, body.comment, owner=owner
            )
        return feedback.add_ranking(
            body.prompt, body.ranking, body.labeler, body.ties, body.comment, owner=owner
        )

    @router.post("/v1/feedback", responses=errors(400, 401, 404, 413, 429))
    async def add_feedback(
        body: RatingFeedback | RankingFeedback, caller: Caller = AUTHORIZED
    ) -> dict:
        feedback = store()
        if body.labeler.startswith(AI_LABELER):
            raise HTTPException(
                400, f"labelers named {AI_LABELER}… are AI feedback (agentkit feedback ai-label)"
            )
        loop = asyncio.get_running_loop()
        try:
            row = await loop.run_in_executor(writer, write, feedback, body, caller.owner)
        except ValueError as error:
            raise HTTPException(400, str(error)) from None
        return {"id": row, "object": "feedback"}

    @router.get(
        "/v1/feedback/export",
        response_class=Response,
        responses={
            **text_body("application/x-ndjson", "One JSON object a line"),
            **errors(400, 401, 404, 429),
        },
    )
    def export(
        format: Literal["pairwise"] = "pairwise",  # noqa: A002
        kind: Literal["human", "ai", "all"] = "all",
        caller: Caller = AUTHORIZED,
    ) -> Response:
        """An admin exports everyone's feedback, any other key its own; ``kind`` keeps human
        labels or AI ones (labelers ``ai:<model>``) only."""
        pairs = store().pairwise(owner=None if caller.admin else caller.name, kind=kind)
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        return Response(lines, media_type="application/x-ndjson")

    return router
