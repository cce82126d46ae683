"""RAG answers with numbered citations: retrieve, number the sources, answer citing [n], check.

    answer = RAG(index, model).ask("How do I rotate the API keys?")
    print(answer.text)                       # "... rotate them with `keys rotate` [2]."
    for c in answer.citations: print(c.number, c.hit.location)

Sources below ``min_similarity`` are not relevant; with none left the model is not asked and the
answer says the documents do not contain it. Citations to numbers outside the list are removed
from the text (streaming too) and reported in ``invalid_citations``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agentkit import tracing
from agentkit.budget import fit_prompt
from agentkit.llm import ChatModel, Message, Usage
from agentkit.prompts import load_messages
from agentkit.retrievers import Hit, Index
from agentkit.settings import Settings

NO_ANSWER = "The sources do not contain the answer."
CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
UNCLOSED = re.compile(r"\[[\d,\s]{0,12}$")  # a citation that may still be arriving


@dataclass
class Citation:
    number: int
    hit: Hit

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "source": self.hit.source,
            "path": self.hit.path,
            "location": self.hit.location,
            "title": self.hit.title,
            "heading": self.hit.heading,
            "text": self.hit.text,
        }


@dataclass
class Answer:
    question: str
    text: str
    citations: list[Citation] = field(default_factory=list)
    sources: list[Hit] = field(default_factory=list)  # as numbered in the prompt
    dropped_sources: list[Hit] = field(default_factory=list)  # did not fit the context
    invalid_citations: list[int] = field(default_factory=list)
    answered: bool = True  # False when the sources do not contain the answer
    usage: Usage = field(default_factory=Usage)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.text,
            "answered": self.answered,
            "citations": [c.to_dict() for c in self.citations],
            "invalid_citations": self.invalid_citations,
            "sources": [h.location for h in self.sources],
            "dropped_sources": [h.location for h in self.dropped_sources],
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
            },
            "timings": self.timings,
        }


class CitationFilter:
    """Removes ``[n]`` that point to no source, from whole texts or from a stream of pieces."""

    def __init__(self, n_sources: int) -> None:
        self.n_sources = n_sources
        self.invalid: list[int] = []
        self.cited: list[int] = []
        self._held = ""

    def _clean(self, match: re.Match[str]) -> str:
        numbers = [int(x) for x in match.group(1).split(",")]
        good = [n for n in numbers if 1 <= n <= self.n_sources]
        self.invalid += [n for n in numbers if n not in good and n not in self.invalid]
        self.cited += [n for n in good if n not in self.cited]
        return "".join(f"[{n}]" for n in good)

    def feed(self, piece: str) -> str:
        text = self._held + piece
        held = UNCLOSED.search(text)
        self._held = held.group(0) if held else ""
        return CITATION.sub(self._clean, text[: held.start()] if held else text)

    def flush(self) -> str:
        text, self._held = self._held, ""
        return CITATION.sub(self._clean, text)


def number_sources(hits: list[Hit]) -> str:
    return "\n\n".join(
        f"[{i}] {h.title}{' › ' + h.heading if h.heading else ''} ({h.location})\n{h.text.strip()}"
        for i, h in enumerate(hits, 1)
    )


class RAG:
    """Retrieval-augmented answers over an ``Index`` with any ``ChatModel``."""

    def __init__(
        self,
        index: Index,
        model: ChatModel,
        *,
        k: int = 5,
        max_tokens: int = 384,
        temperature: float = 0.0,
        min_similarity: float = 0.2,
        prompt: str = "rag_answer",
    ) -> None:
        self.index, self.model, self.k = index, model, k
        self.max_tokens, self.temperature = max_tokens, temperature
        self.min_similarity, self.prompt = min_similarity, prompt

    @classmethod
    def from_settings(
        cls, index: Index, model: ChatModel, settings: Settings, *, max_tokens: int | None = None
    ) -> RAG:
        """RAG with ``AGENTKIT_RAG_K``, ``_MAX_TOKENS`` and ``_MIN_SIMILARITY`` applied (a request's
        own ``max_tokens`` wins): how every entry point builds it."""
        return cls(
            index,
            model,
            k=settings.rag_k,
            max_tokens=max_tokens or settings.rag_max_tokens,
            min_similarity=settings.rag_min_similarity,
        )

    def prepare(self, question: str) -> tuple[Answer, list[Message] | None, int]:
        """Retrieve and build the prompt; returns the answer so far, messages and token room."""
        started = time.perf_counter()
        hits = self.index.search(question, k=self.k)
        relevant = [h for h in hits if (h.similarity or 0.0) >= self.min_similarity]
        retrieved = time.perf_counter()
        answer = Answer(question=question, text=NO_ANSWER, answered=False)
        answer.timings["retrieve_s"] = retrieved - started
        if not relevant:
            return answer, None, 0

        def build(kept: int) -> list[Message]:
            sources = number_sources(relevant[:kept]) or "(none)"
            return load_messages(self.prompt, sources=sources, question=question)

        fitted = fit_prompt(self.model, build, len(relevant), self.max_tokens)
        answer.sources, answer.dropped_sources = relevant[: fitted.kept], relevant[fitted.kept :]
        answer.timings["prompt_s"] = time.perf_counter() - retrieved
        return answer, fitted.messages, fitted.max_tokens

    def finish(self, answer: Answer, text: str, cited: list[int], invalid: list[int]) -> Answer:
        answer.text = text.strip()
        answer.citations = [Citation(n, answer.sources[n - 1]) for n in cited]
        answer.invalid_citations = invalid
        answer.answered = bool(answer.sources) and NO_ANSWER.rstrip(".") not in answer.text
        return answer

    def ask(self, question: str) -> Answer:
        with tracing.agent_span("agentkit-rag", question) as run:
            answer, messages, room = self.prepare(question)
            if messages is None:
                return traced(run, answer)
            started = time.perf_counter()
            completion = tracing.complete(
                self.model, messages, max_tokens=room, temperature=self.temperature
            )
            answer.timings["generate_s"] = time.perf_counter() - started
            answer.usage = completion.usage
            check = CitationFilter(len(answer.sources))
            text = check.feed(completion.text) + check.flush()
            return traced(run, self.finish(answer, text, check.cited, check.invalid))

    def stream(self, question: str) -> Iterator[str | Answer]:
        """Yields the answer's text as it arrives (citations already checked), then the Answer."""
        run = tracing.agent_span("agentkit-rag", question, current=False)
        try:
            yield from self._stream(question, run)
        except BaseException as error:
            run.__exit__(type(error), error, None)
            raise
        run.end()

    def _stream(self, question: str, run: Any) -> Iterator[str | Answer]:
        with tracing.use_context(run.context()):
            answer, messages, room = self.prepare(question)
        if messages is None:
            yield answer.text
            yield traced(run, answer)
            return
        started = time.perf_counter()
        check = CitationFilter(len(answer.sources))
        parts: list[str] = []
        deltas = tracing.stream(
            self.model, messages, parent=run, max_tokens=room, temperature=self.temperature
        )
        for delta in deltas:
            if delta.usage is not None:
                answer.usage = delta.usage
            if piece := check.feed(delta.text):
                parts.append(piece)
                yield piece
        if tail := check.flush():
            parts.append(tail)
            yield tail
        answer.timings["generate_s"] = time.perf_counter() - started
        yield traced(run, self.finish(answer, "".join(parts), check.cited, check.invalid))


def traced(run: Any, answer: Answer) -> Answer:
    """Record an answer's outcome on its run's span; the answer."""
    run.set("agentkit.rag.sources", len(answer.sources))
    run.set("agentkit.rag.dropped_sources", len(answer.dropped_sources))
    run.set("agentkit.rag.answered", answer.answered)
    run.set("gen_ai.usage.input_tokens", answer.usage.prompt_tokens)
    run.set("gen_ai.usage.output_tokens", answer.usage.completion_tokens)
    return answer
