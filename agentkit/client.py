"""``agentkit.Client``: the Python SDK for the agentkit REST API (sync and async).

client = Client("http://127.0.0.1:8080", api_key="...")
reply = client.chat("What was the first release called?", model="agentkit-rag")
reply.text, reply.citations
for piece in client.chat_stream("..."): print(piece, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from agentkit.errors import LLMError
from agentkit.sse import aiter_events, iter_events


@dataclass
class ChatReply:
    text: str
    model: str
    usage: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # citations, PAL program, ReAct steps

    @property
    def citations(self) -> list[dict[str, Any]]:
        return list(self.extra.get("citations", []))


def _messages(question: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}] if isinstance(question, str) else question


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise LLMError(f"agentkit API error {response.status_code}: {message}")
    return response


def _reply(data: dict[str, Any]) -> ChatReply:
    return ChatReply(
        data["choices"][0]["message"]["content"],
        data["model"],
        data.get("usage", {}),
        data.get("agentkit", {}),
    )


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 600) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def chat(
        self, question: str | list[dict[str, str]], *, model: str = "agentkit-rag", **options: Any
    ) -> ChatReply:
        body = {"model": model, "messages": _messages(question), **options}
        return _reply(_check(self._http.post("/v1/chat/completions", json=body)).json())

    def chat_stream(
        self, question: str | list[dict[str, str]], *, model: str = "agentkit-rag", **options: Any
    ) -> Iterator[str | dict[str, Any]]:
        """Text pieces (str) and agent events (dict: citations, steps) as they arrive."""
        body = {"model": model, "messages": _messages(question), "stream": True, **options}
        with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                _check(response)
            for event in iter_events(response.iter_lines()):
                if "agentkit" in event:
                    yield event["agentkit"]
                text = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
                if text:
                    yield text

    def search(self, query: str, k: int = 5) -> list[dict[str, Any]]:
        return _check(self._http.post("/v1/search", json={"query": query, "k": k})).json()["data"]

    def feedback(self, **record: Any) -> int:
        return int(_check(self._http.post("/v1/feedback", json=record)).json()["id"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 600) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s
        )

    async def chat(
        self, question: str | list[dict[str, str]], *, model: str = "agentkit-rag", **options: Any
    ) -> ChatReply:
        body = {"model": model, "messages": _messages(question), **options}
        return _reply(_check(await self._http.post("/v1/chat/completions", json=body)).json())

    async def chat_stream(
        self, question: str | list[dict[str, str]], *, model: str = "agentkit-rag", **options: Any
    ) -> AsyncIterator[str | dict[str, Any]]:
        body = {"model": model, "messages": _messages(question), "stream": True, **options}
        async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                _check(response)
            async for event in aiter_events(response.aiter_lines()):
                if "agentkit" in event:
                    yield event["agentkit"]
                text = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
                if text:
                    yield text

    async def aclose(self) -> None:
        await self._http.aclose()
