"""Human feedback: ratings and rankings in, pairwise preferences out."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from agentkit.services.api_state import ApiState
from agentkit.services.auth import AUTHORIZED, Caller
from agentkit.services.feedback import FeedbackStore
from agentkit.services.schemas import RankingFeedback, RatingFeedback, errors, text_body


def feedback_router(state: ApiState) -> APIRouter:
    router = APIRouter()

    def store() -> FeedbackStore:
        if state.feedback is None:
            raise HTTPException(404, "feedback is not enabled on this server")
        return state.feedback

    @router.post("/v1/feedback", responses=errors(400, 401, 404, 413, 429))
    def add_feedback(body: RatingFeedback | RankingFeedback, caller: Caller = AUTHORIZED) -> dict:
        feedback = store()
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
        caller: Caller = AUTHORIZED,
    ) -> Response:
        """An admin exports everyone's feedback, any other key its own."""
        pairs = store().pairwise(owner=None if caller.admin else caller.name)
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        return Response(lines, media_type="application/x-ndjson")

    return router
