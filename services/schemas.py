"""The API's request and response bodies and its error shape (OpenAI's), as the OpenAPI schema
documents them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agentkit.errors import (
    AgentkitError,
    ContextBudgetError,
    InvalidPathError,
    InvalidQueryError,
    LLMError,
    OutsideRootsError,
    ToolError,
)
from agentkit.services.conversations import ConversationNotFound

NOT_BLANK = r"\S"  # what a field the server reads as text must contain


class StrictModel(BaseModel):
    """A request body read as JSON: no coercion (``stream: 0``, ``temperature: false`` and
    ``k: "5"`` are 400s, as the schema says), unknown fields ignored (OpenAI clients send more)."""

    model_config = ConfigDict(strict=True)


def whole_number(value: object) -> object:
    """JSON does not tell 5 from 5.0, nor does JSON Schema's ``integer``: an integral float is
    that integer (``true`` stays refused). For the ``int`` fields of a StrictModel."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=200_000)


class StreamOptions(StrictModel):
    include_usage: bool = False


class ChatRequest(StrictModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "agentkit-rag",
                    "messages": [{"role": "user", "content": "Which module needs zlib?"}],
                }
            ]
        }
    )

    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=500)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    user: str | None = Field(None, max_length=200)
    conversation_id: str | None = Field(None, min_length=1, max_length=200)
    best_of: int | None = Field(
        None, ge=1, le=16, description="agentkit: sample N answers, return the best by the reward"
    )
    revise: bool = Field(
        False, description="agentkit: critique the answer by the constitution and revise it"
    )

    _whole_numbers = field_validator("max_tokens", "n", "best_of", mode="before")(whole_number)


class FolderRequest(StrictModel):
    folder: str = Field(min_length=1, max_length=4096)


class SearchRequest(StrictModel):
    query: str = Field(min_length=1, max_length=4096, pattern=NOT_BLANK)
    k: int = Field(5, ge=1, le=100)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"

    _whole_numbers = field_validator("k", mode="before")(whole_number)


class RatingFeedback(StrictModel):
    prompt: str = Field(min_length=1, max_length=100_000)
    completion: str = Field(max_length=100_000)
    rating: Literal[1, -1]
    comment: str | None = Field(None, max_length=10_000)
    labeler: str = Field(min_length=1, max_length=200)

    @field_validator("rating", mode="before")
    @classmethod
    def not_a_boolean(cls, rating: object) -> object:
        if isinstance(rating, bool):  # True == 1 would pass Literal[1, -1]
            raise ValueError("rating must be the number 1 or -1")
        return rating


class RankingFeedback(StrictModel):
    prompt: str = Field(min_length=1, max_length=100_000)
    ranking: list[str] = Field(min_length=2, max_length=50, json_schema_extra={"uniqueItems": True})
    ties: list[Annotated[list[str], Field(min_length=2)]] | None = None  # of ranked ones
    comment: str | None = Field(None, max_length=10_000)
    labeler: str = Field(min_length=1, max_length=200)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, for every 4xx and 5xx (and for an error event inside a stream)."""

    error: ErrorDetail


class Readiness(BaseModel):
    ready: bool
    index: bool
    model: bool


ERRORS = {
    400: "The request cannot be served as sent (a malformed body, a question longer than the "
    "model's context, a file no loader opens, ...)",
    401: "A missing or unknown API key (only when keys are set)",
    403: "The API key's role may not do this",
    404: "Nothing by that name for this API key, or the feature is not enabled here",
    409: "It conflicts with what another API key owns",
    413: "The body is larger than AGENTKIT_API_MAX_BODY_BYTES",
    429: "The API key's rate limit is reached; retry in a minute",
    502: "The model server refused the request",
    503: "The model server cannot be reached, or this server is shutting down",
}


# One event of a chat stream: a chunk, an error, or the end.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "type": "object",
                        "anyOf": [
                            {
                                "required": ["id", "object", "choices"],
                                "properties": {"object": {"const": "chat.completion.chunk"}},
                            },
                            {"required": ["error"], "properties": {"error": {"type": "object"}}},
                        ],
                    },
                },
            ]
        }
    },
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` documenting error statuses in OpenAI's error shape."""
    return {s: {"model": ErrorResponse, "description": ERRORS[s]} for s in statuses}


def text_body(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` documenting a 200 that is text of ``media_type``."""
    content = {media_type: {"schema": {"type": "string"}}}
    return {200: {"description": description, "content": content}}


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_status(error: AgentkitError) -> int:
    """The HTTP status an error of ours answers."""
    if isinstance(error, OutsideRootsError):
        return 403
    if isinstance(error, (InvalidQueryError, ContextBudgetError, ToolError, InvalidPathError)):
        return 400
    if isinstance(error, ConversationNotFound):
        return 404
    if isinstance(error, LLMError):
        return 502  # the model server refused the request
    return 503  # the model server is down or unusable


ERROR_KINDS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
