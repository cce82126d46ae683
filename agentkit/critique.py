"""Critique and revise an answer against the constitution (Constitutional AI, stage 1).

Three short calls to the served model: a critique of the answer under the principles' critique
requests, a constrained yes/no on whether the critique found a problem, and, only when it did, a
rewrite under the revision requests. ``Revision`` keeps the original, the critique and the final
answer, so the API can show all three.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agentkit.constitution import Constitution, load_constitution
from agentkit.errors import GuardError
from agentkit.llm import ChatModel, Structured, Usage
from agentkit.prompts import load_messages


@dataclass
class Revision:
    original: str
    final: str
    critique: str
    revised: bool
    principles: list[str]
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "critique": self.critique,
            "revised": self.revised,
            "principles": self.principles,
            "latency_s": round(self.latency_s, 4),
        }


class Critic:
    """Critiques answers by a constitution and rewrites those with a problem."""

    def __init__(
        self,
        model: ChatModel,
        constitution: Constitution | None = None,
        *,
        critique_tokens: int = 96,
        revision_tokens: int = 256,
    ) -> None:
        self.model = model
        self.constitution = constitution or load_constitution()
        self.critique_tokens, self.revision_tokens = critique_tokens, revision_tokens

    def revise(self, question: str, answer: str, *, force: bool = False) -> Revision:
        """The answer critiqued, and rewritten when the critique finds a problem (always with
        ``force``, e.g. when a guard flagged it). GuardError when the rewrite is empty."""
        started = time.perf_counter()
        c = self.constitution
        critique = self.model.complete(
            load_messages(
                "critique", question=question, answer=answer, requests=c.critique_requests()
            ),
            max_tokens=self.critique_tokens,
            temperature=0.0,
        )
        usage = critique.usage
        problem = force
        if not force:
            verdict = self.model.complete(
                load_messages("critique_verdict", critique=critique.text),
                max_tokens=2,
                temperature=0.0,
                structured=Structured(choice=["yes", "no"]),
            )
            usage += verdict.usage
            problem = verdict.text.strip().lower().startswith("yes")
        final = answer
        if problem:
            rewrite = self.model.complete(
                load_messages(
                    "revision",
                    question=question,
                    answer=answer,
                    critique=critique.text.strip(),
                    requests=c.revision_requests(),
                ),
                max_tokens=self.revision_tokens,
                temperature=0.0,
            )
            usage += rewrite.usage
            final = rewrite.text.strip()
            if not final:
                raise GuardError("the revision came back empty; the original answer was kept out")
        return Revision(answer, final, critique.text.strip(), problem, c.names(), usage,
                        time.perf_counter() - started)  # fmt: skip
