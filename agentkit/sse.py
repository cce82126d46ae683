"""Server-sent events as OpenAI-compatible servers send them: ``data: {json}`` lines, ``[DONE]``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from agentkit.errors import LLMError

DONE = "[DONE]"


def parse_event_line(line: str) -> dict[str, Any] | str | None:
    """The JSON of one ``data:`` line, ``DONE`` for the end marker, ``None`` for anything else."""
    if not line.startswith("data:"):
        return None  # blank separators, comments (": ping"), event:/id: fields
    payload = line[5:].strip()
    if payload == DONE:
        return DONE
    try:
        event = json.loads(payload)
    except ValueError:
        raise LLMError(
            f"the model server sent a malformed stream event: {payload[:200]!r}"
        ) from None
    if isinstance(event, dict) and "error" in event:
        raise LLMError(f"the model server failed mid-stream: {event['error']}")
    return event


def iter_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Events until ``[DONE]``; a stream that ends without it was cut off and raises."""
    for line in lines:
        event = parse_event_line(line)
        if event == DONE:
            return
        if isinstance(event, dict):
            yield event
    raise LLMError("the model server closed the stream before it finished (no [DONE]); retry")


async def aiter_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        event = parse_event_line(line)
        if event == DONE:
            return
        if isinstance(event, dict):
            yield event
    raise LLMError("the model server closed the stream before it finished (no [DONE]); retry")
