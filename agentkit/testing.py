"""Test doubles that are real implementations, for agentkit's tests and yours.

``ScriptedChatModel`` is a ``ChatModel`` that answers from a script:

    model = ScriptedChatModel(["first reply", "second reply"])
    model = ScriptedChatModel(lambda messages, **kw: "echo: " + messages[-1]["content"])

Replies are cut at the first ``stop`` string, as a server would; every call is recorded in
``model.calls`` (the messages, and the generation options as keyword arguments) so a test can
assert on the prompt.

``HashingEmbedder`` embeds by feature hashing (no model, deterministic), for indexes in tests:
``index_folder(folder, path, embedder=HashingEmbedder())``.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agentkit.errors import LLMError
from agentkit.llm import (
    Completion,
    Delta,
    Message,
    ModelSettings,
    Structured,
    ToolCall,
    Usage,
)

Script = Iterable[str] | Callable[..., str]


@dataclass
class Call:
    messages: list[dict[str, str]]
    kwargs: dict[str, Any]


TOKEN = re.compile(r"\w+|[^\w\s]")


def count_words(text: str) -> int:
    """Words and punctuation marks: the token count of the test doubles."""
    return len(TOKEN.findall(text))


class WordCounter:
    """Counts words and punctuation marks as tokens (the ``TokenCounter`` interface)."""

    def count(self, text: str) -> int:
        return count_words(text)

    def cut(self, text: str, max_tokens: int) -> list[str]:
        starts = [m.start() for m in TOKEN.finditer(text)]
        cuts = starts[max_tokens::max_tokens]
        bounds = [0, *cuts, len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


class HashingEmbedder:
    """Bag-of-words vectors by feature hashing: deterministic, no model, ~microseconds.

    ``embedded`` records every text embedded; ``delay_s`` makes each batch that much slower.
    """

    backend = "hashing"

    def __init__(
        self, name: str = "test/hashing", dim: int = 64, max_tokens: int = 64, delay_s: float = 0.0
    ):
        self.name, self.dim, self.max_tokens, self.delay_s = name, dim, max_tokens, delay_s
        self.counter = WordCounter()
        self.embedded: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.embedded.extend(texts)
        if self.delay_s:
            time.sleep(self.delay_s)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in TOKEN.findall(text.lower()):
                bucket = int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little")
                out[row, bucket % self.dim] += 1.0
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


class ScriptedChatModel:
    """Answers from a list of replies (in order) or from a function of the messages."""

    def __init__(
        self, script: Script, *, context_length: int = 4096, check_structured: bool = True
    ):
        self._function = script if callable(script) else None
        self._replies = iter(()) if callable(script) else iter(list(script))
        self._context_length = context_length
        self.check_structured = check_structured
        self.calls: list[Call] = []

    def _reply(self, messages: Sequence[Message], **kwargs: Any) -> str:
        self.calls.append(Call([dict(m) for m in messages], kwargs))
        if self._function is not None:
            text = self._function(list(messages), **kwargs)
        else:
            try:
                text = next(self._replies)
            except StopIteration:
                calls = len(self.calls)
                raise LLMError(f"ScriptedChatModel ran out of replies at call {calls}") from None
        for stop in kwargs.get("stop") or ():
            text = text.split(stop, 1)[0]
        structured: Structured | None = kwargs.get("structured")
        if self.check_structured and structured is not None and structured.regex is not None:
            if not re.fullmatch(structured.regex, text, flags=re.DOTALL):
                raise LLMError(f"scripted reply {text!r} does not match {structured.regex!r}")
        return text

    def complete(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> Completion:
        chosen = ModelSettings.of(settings, options)
        texts = [self._reply(messages, **vars(chosen)) for _ in range(chosen.n)]
        usage = Usage(self.count_tokens(messages), sum(count_words(t) for t in texts))
        return Completion(texts=texts, finish_reason="stop", usage=usage, model="scripted")

    async def acomplete(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> Completion:
        return self.complete(messages, settings, **options)

    def stream(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> Iterator[Delta]:
        text = self._reply(messages, **vars(ModelSettings.of(settings, options, stream=True)))
        for piece in re.findall(r"\s*\S+|\s+$", text):
            yield Delta(piece)
        yield Delta("", "stop", Usage(self.count_tokens(messages), count_words(text)))

    async def astream(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> AsyncIterator[Delta]:
        for delta in self.stream(messages, settings, **options):
            yield delta

    def complete_tools(
        self,
        messages: Sequence[Any],
        tools: Sequence[Any],
        settings: ModelSettings | None = None,
        **options: Any,
    ) -> Completion:
        """A reply ``"name(json arguments)"`` from the script becomes a tool call."""
        text = self._reply(messages, tools=tools, **vars(ModelSettings.of(settings, options)))
        match = re.fullmatch(r"(\w+)\((.*)\)", text.strip(), re.S)
        if match is None:
            return Completion(texts=[text], finish_reason="stop", model="scripted")
        call = ToolCall(f"call_{len(self.calls)}", match.group(1), match.group(2))
        return Completion(
            texts=[""], finish_reason="tool_calls", model="scripted", tool_calls=[call]
        )

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(count_words(m.get("content", "")) + 4 for m in messages) + 2

    def context_length(self) -> int:
        return self._context_length
