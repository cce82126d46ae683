"""``agentkit.Client``: the Python SDK for the agentkit REST API, sync and async.

    with Client("http://127.0.0.1:8080", api_key="...") as client:
        reply = client.chat("What was the first release called?", model="agentkit-rag")
        reply.text, reply.citations
        for piece in client.chat_stream("..."): print(piece, end="")

``AsyncClient`` has the same methods, to await (``async with AsyncClient(...) as client``).
Both build their requests and read the answers with the same functions; only the I/O differs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from agentkit.errors import LLMError
from agentkit.sse import aiter_events, iter_events

CHAT = "/v1/chat/completions"
Question = str | list[dict[str, str]]


@dataclass
class ChatReply:
    text: str
    model: str
    usage: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # citations, PAL program, ReAct steps

    @property
    def citations(self) -> list[dict[str, Any]]:
        return list(self.extra.get("citations", []))


def _http_options(base_url: str, api_key: str | None, timeout_s: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {"base_url": base_url.rstrip("/"), "headers": headers, "timeout": timeout_s}


def _chat_body(
    question: Question, model: str, options: dict[str, Any], stream: bool = False
) -> dict[str, Any]:
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    return {"model": model, "messages": messages, **({"stream": True} if stream else {}), **options}


def _check(response: httpx.Response) -> httpx.Response:
    """The response, or our error with the API's reason (a streamed response: read first)."""
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise LLMError(f"agentkit API error {response.status_code}: {message}")
    return response


def _reply(response: httpx.Response) -> ChatReply:
    data = _check(response).json()
    return ChatReply(
        data["choices"][0]["message"]["content"],
        data["model"],
        data.get("usage", {}),
        data.get("agentkit", {}),
    )


def _stream_items(event: dict[str, Any]) -> list[str | dict[str, Any]]:
    """What one chunk of a chat stream holds for the caller: the agent's event (citations, a
    step; a dict), then the text piece (a str)."""
    items: list[str | dict[str, Any]] = [event["agentkit"]] if "agentkit" in event else []
    text = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
    return [*items, text] if text else items


class Client:
    """The agentkit REST API: chat (plain or streamed), search, feedback."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 600) -> None:
        self._http = httpx.Client(**_http_options(base_url, api_key, timeout_s))

    def chat(self, question: Question, *, model: str = "agentkit-rag", **options: Any) -> ChatReply:
        """One answer; ``options`` are further chat-completion fields (``max_tokens``, ...)."""
        return _reply(self._http.post(CHAT, json=_chat_body(question, model, options)))

    def chat_stream(
        self, question: Question, *, model: str = "agentkit-rag", **options: Any
    ) -> Iterator[str | dict[str, Any]]:
        """Text pieces (str) and agent events (dict: citations, steps) as they arrive."""
        body = _chat_body(question, model, options, stream=True)
        with self._http.stream("POST", CHAT, json=body) as response:
            if response.is_error:
                response.read()  # the API's reason, for the error
            _check(response)
            for event in iter_events(response.iter_lines()):
                yield from _stream_items(event)

    def search(self, query: str, k: int = 5) -> list[dict[str, Any]]:
        """The index's ``k`` best hits for ``query`` (text, source, score, ...)."""
        return _check(self._http.post("/v1/search", json={"query": query, "k": k})).json()["data"]

    def feedback(self, **record: Any) -> int:
        """Store a rating or a ranking (see the README's REST API); returns its id."""
        return int(_check(self._http.post("/v1/feedback", json=record)).json()["id"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """``Client`` to await: the same methods, and ``async with`` for closing."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 600) -> None:
        self._http = httpx.AsyncClient(**_http_options(base_url, api_key, timeout_s))

    async def chat(
        self, question: Question, *, model: str = "agentkit-rag", **options: Any
    ) -> ChatReply:
        return _reply(await self._http.post(CHAT, json=_chat_body(question, model, options)))

    async def chat_stream(
        self, question: Question, *, model: str = "agentkit-rag", **options: Any
    ) -> AsyncIterator[str | dict[str, Any]]:
        body = _chat_body(question, model, options, stream=True)
        async with self._http.stream("POST", CHAT, json=body) as response:
            if response.is_error:
                await response.aread()
            _check(response)
            async for event in aiter_events(response.aiter_lines()):
                for item in _stream_items(event):
                    yield item

    async def search(self, query: str, k: int = 5) -> list[dict[str, Any]]:
        response = await self._http.post("/v1/search", json={"query": query, "k": k})
        return _check(response).json()["data"]

    async def feedback(self, **record: Any) -> int:
        return int(_check(await self._http.post("/v1/feedback", json=record)).json()["id"])

    async def close(self) -> None:
        await self._http.aclose()

    aclose = close  # httpx's name for it

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
