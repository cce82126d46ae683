"""The SDK clients against the REST API app: ``AsyncClient`` answers as ``Client`` does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fake_server import serving
from fakes import HashingEmbedder

from agentkit import AsyncClient, Client, Index, index_folder
from agentkit.errors import LLMError
from agentkit.services.api import create_app
from agentkit.services.feedback import FeedbackStore
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel

QUESTION = "Which module needs zlib?"
RATING = {"prompt": "p", "completion": "good", "rating": 1, "labeler": "ann"}
RANKING = {"prompt": "q", "ranking": ["a", "b", "c"], "labeler": "bob"}


def reply(messages: list[dict[str, str]], **options: Any) -> str:
    if "Sources:" in messages[-1]["content"]:
        return "The aardvark module needs zlib [1]."
    return "Echo: " + messages[-1]["content"]


@pytest.fixture
def api(docs: Path, settings: Settings, embedder: HashingEmbedder, tmp_path: Path):
    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        with serving(create_app(ScriptedChatModel(reply), index, feedback=store)) as url:
            yield url, store


def sync_session(url: str) -> dict[str, Any]:
    with Client(url) as client:
        return {
            "chat": client.chat(QUESTION),
            "stream": list(client.chat_stream(QUESTION)),
            "echo": client.chat("hi", model="agentkit-unknown-passes-through"),
            "search": client.search("aardvark zlib", k=2),
            "feedback": [client.feedback(**RATING), client.feedback(**RANKING)],
        }


async def async_session(url: str) -> dict[str, Any]:
    async with AsyncClient(url) as client:
        return {
            "chat": await client.chat(QUESTION),
            "stream": [item async for item in client.chat_stream(QUESTION)],
            "echo": await client.chat("hi", model="agentkit-unknown-passes-through"),
            "search": await client.search("aardvark zlib", k=2),
            "feedback": [await client.feedback(**RATING), await client.feedback(**RANKING)],
        }


def test_the_async_client_answers_as_the_sync_client_does(api) -> None:
    url, store = api
    done = sync_session(url)
    awaited = asyncio.run(async_session(url))

    for session in (done, awaited):
        assert session["chat"].text == "The aardvark module needs zlib [1]."
        assert session["chat"].citations[0]["source"] == "guide/install.md"
        text = "".join(i for i in session["stream"] if isinstance(i, str))
        events = [i for i in session["stream"] if isinstance(i, dict)]
        assert text.strip() == session["chat"].text
        assert events[-1]["citations"][0]["source"] == "guide/install.md"
        assert session["echo"].text == "Echo: hi"
        assert [h["source"] for h in session["search"]][:1] == ["guide/install.md"]
        assert len(session["search"]) == 2
    assert awaited["chat"] == done["chat"] and awaited["stream"] == done["stream"]
    assert awaited["search"] == done["search"]
    assert len({*done["feedback"], *awaited["feedback"]}) == 4  # four records, four ids
    assert store.count() == 4


BAD_REQUESTS = [  # method, arguments: each one a 4xx from the API
    ("search", (" ",), {}),
    ("feedback", (), {"prompt": "p", "rating": 5, "labeler": "x"}),
    ("chat", ([],), {}),
    ("chat_stream", ([],), {}),
]


async def async_errors(url: str) -> list[str]:
    messages = []
    async with AsyncClient(url) as client:
        for method, args, kwargs in BAD_REQUESTS:
            call = getattr(client, method)(*args, **kwargs)
            with pytest.raises(LLMError) as raised:
                await (anext(call) if method == "chat_stream" else call)
            messages.append(str(raised.value))
    return messages


def test_both_clients_raise_the_apis_reason_for_a_bad_request(api) -> None:
    url, _ = api
    messages = []
    with Client(url) as client:
        for method, args, kwargs in BAD_REQUESTS:
            with pytest.raises(LLMError) as raised:
                call = getattr(client, method)(*args, **kwargs)
                if method == "chat_stream":  # a generator: the request goes out at the first item
                    next(call)
            messages.append(str(raised.value))
    assert [m[:22] for m in messages] == ["agentkit API error 400"] * 4
    assert asyncio.run(async_errors(url)) == messages
