"""``ScriptedChatModel``: a ``ChatModel`` that answers from a script, for tests (yours too).

    model = ScriptedChatModel(["first reply", "second reply"])
    model = ScriptedChatModel(lambda messages, **kw: "echo: " + messages[-1]["content"])

Replies are cut at the first ``stop`` string, as a server would; every call is recorded in
``model.calls`` (messages and keyword arguments) so a test can assert on the prompt.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from agentkit.errors import LLMError
from agentkit.llm import Completion, Delta, Message, Structured, ToolCall, Usage

Script = Iterable[str] | Callable[..., str]


@dataclass
class Call:
    messages: list[dict[str, str]]
    kwargs: dict[str, Any]


def count_words(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


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

    def _completion(self, messages: Sequence[Message], n: int, **kwargs: Any) -> Completion:
        texts = [self._reply(messages, n=n, **kwargs) for _ in range(n)]
        usage = Usage(self.count_tokens(messages), sum(count_words(t) for t in texts))
        return Completion(texts=texts, finish_reason="stop", usage=usage, model="scripted")

    def complete(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int = 1,
        structured: Structured | None = None,
    ) -> Completion:
        kwargs = {"stop": stop, "max_tokens": max_tokens, "temperature": temperature}
        return self._completion(messages, n, structured=structured, **kwargs)

    async def acomplete(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int = 1,
        structured: Structured | None = None,
    ) -> Completion:
        kwargs = {"stop": stop, "max_tokens": max_tokens, "temperature": temperature}
        return self._completion(messages, n, structured=structured, **kwargs)

    def stream(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        structured: Structured | None = None,
    ) -> Iterator[Delta]:
        kwargs = {"stop": stop, "max_tokens": max_tokens, "temperature": temperature}
        text = self._reply(messages, n=1, structured=structured, **kwargs)
        for piece in re.findall(r"\s*\S+|\s+$", text):
            yield Delta(piece)
        yield Delta("", "stop", Usage(self.count_tokens(messages), count_words(text)))

    async def astream(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        structured: Structured | None = None,
    ) -> AsyncIterator[Delta]:
        kwargs = {"stop": stop, "max_tokens": max_tokens, "temperature": temperature}
        for delta in self.stream(messages, structured=structured, **kwargs):
            yield delta

    def complete_tools(
        self,
        messages: Sequence[Any],
        tools: Sequence[Any],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Completion:
        """A reply ``"name(json arguments)"`` from the script becomes a tool call."""
        text = self._reply(messages, tools=tools, max_tokens=max_tokens, temperature=temperature)
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
