"""Moderation guards: classify a user's message or an answer as safe or unsafe, with a category.

Three kinds, one protocol (``check(messages, stage) -> Verdict``):

- ``JudgeGuard``: the served model as a judge, its verdict constrained by vLLM structured outputs
  (``choice``) to ``safe`` or ``unsafe: <category>``;
- ``LlamaGuard``: a dedicated guard model served by vLLM (Llama Guard 3 and its kin), named by URL
  and model; it answers ``safe`` or ``unsafe`` and a line of category codes (``S1,S10``);
- ``CallableGuard``: any Python function of the text.

A guard raises when it cannot decide (server down, an answer that does not parse); the runner
(``agentkit.guardrails``) turns that into a fail-open or fail-closed verdict by the rule's
``on_error``. For the input stage ``messages`` is the chat so far; for the output stage it ends
with the assistant's answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from agentkit.errors import GuardError
from agentkit.llm import ChatModel, Message, OpenAIChatModel, Structured, Usage
from agentkit.prompts import load_messages

Stage = Literal["input", "output"]
CATEGORIES = ("violence", "weapons", "crime", "self-harm", "sexual", "hate", "privacy", "other")
MAX_MESSAGE_CHARS = 4000  # per message shown to a judge: the head and the tail of longer ones

# Llama Guard 3's hazard taxonomy (MLCommons), as its model card lists it.
LLAMA_GUARD_CATEGORIES = {
    "S1": "violent crimes",
    "S2": "non-violent crimes",
    "S3": "sex-related crimes",
    "S4": "child sexual exploitation",
    "S5": "defamation",
    "S6": "specialized advice",
    "S7": "privacy",
    "S8": "intellectual property",
    "S9": "indiscriminate weapons",
    "S10": "hate",
    "S11": "suicide and self-harm",
    "S12": "sexual content",
    "S13": "elections",
    "S14": "code interpreter abuse",
}


@dataclass
class Verdict:
    """One guard's decision on one stage. ``error`` is set when the guard failed and the verdict
    is the rule's fail-open (safe) or fail-closed (unsafe) default."""

    safe: bool
    category: str | None = None
    guard: str = ""
    stage: Stage = "input"
    error: str | None = None
    latency_s: float = 0.0
    usage: Usage = field(default_factory=Usage)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["usage"] = {"prompt_tokens": self.usage.prompt_tokens,
                         "completion_tokens": self.usage.completion_tokens}  # fmt: skip
        data["latency_s"] = round(self.latency_s, 4)
        return data


@runtime_checkable
class Guard(Protocol):
    name: str

    def check(self, messages: Sequence[Message], stage: Stage) -> Verdict:
        """Safe or unsafe; raise (any exception) when the guard cannot decide."""
        ...


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text``, or its head and tail around a marker when longer than ``limit``."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[… {len(text) - 2 * half} characters left out …]\n{text[-half:]}"


def render_conversation(messages: Sequence[Message]) -> str:
    """The chat as ``User: …`` / ``Assistant: …`` lines for a judge (system messages left out).

    A message cannot fake a turn of its own: line starts that look like a role get a marker.
    """
    names = {"user": "User", "assistant": "Assistant"}
    lines = []
    for message in messages:
        role = names.get(message.get("role", ""))
        if role is None:
            continue
        text = clip(message.get("content") or "")
        text = "\n".join(
            f"> {line}" if line.lstrip().lower().startswith(("user:", "assistant:")) else line
            for line in text.splitlines()
        )
        lines.append(f"{role}: {text}")
    return "\n".join(lines)


def parse_judge_verdict(
    text: str, categories: Sequence[str] = CATEGORIES
) -> tuple[bool, str | None]:
    """``safe`` / ``unsafe: <category>`` (case, spaces and a trailing full stop tolerated; an
    unknown category becomes ``other``). GuardError for anything else."""
    answer = text.strip().strip(".\"'").strip().lower()
    if answer == "safe" or answer.startswith("safe\n"):
        return True, None
    if answer.startswith("unsafe"):
        category = answer[len("unsafe") :].lstrip(" :-").split("\n")[0].strip()
        return False, category if category in categories else "other"
    raise GuardError(  # its text stays out: it may echo what was being checked
        f"the judge's verdict ({len(text)} characters) is neither 'safe' nor 'unsafe: …'; serve "
        "the judge with structured outputs (vLLM ≥ 0.10.2)"
    )


class JudgeGuard:
    """The served model as a moderation judge (one short, constrained completion per check)."""

    def __init__(
        self,
        model: ChatModel,
        *,
        categories: Sequence[str] = CATEGORIES,
        name: str = "judge",
        max_tokens: int = 8,
    ) -> None:
        self.model, self.categories, self.name, self.max_tokens = (
            model,
            tuple(categories),
            name,
            max_tokens,
        )
        self.choices = ["safe", *(f"unsafe: {c}" for c in self.categories)]

    def check(self, messages: Sequence[Message], stage: Stage) -> Verdict:
        started = time.perf_counter()
        subject = "user's message" if stage == "input" else "assistant's last answer"
        prompt = load_messages(
            "guard_judge",
            subject=subject,
            categories=", ".join(self.categories),
            conversation=render_conversation(messages),
        )
        done = self.model.complete(
            prompt,
            max_tokens=self.max_tokens,
            temperature=0.0,
            structured=Structured(choice=self.choices),
        )
        safe, category = parse_judge_verdict(done.text, self.categories)
        return Verdict(safe, category, self.name, stage, None, time.perf_counter() - started,
                       done.usage)  # fmt: skip


def parse_llama_guard(text: str) -> tuple[bool, list[str]]:
    """Llama Guard's answer: ``safe``, or ``unsafe`` and a line of codes such as ``S1,S10``.
    Returns (safe, the codes); GuardError for anything else."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise GuardError("the guard model's answer is empty; is it a Llama Guard model?")
    head = lines[0].lower()
    if head == "safe":
        return True, []
    if head == "unsafe":
        codes = [c.strip().upper() for c in (lines[1] if len(lines) > 1 else "").split(",")]
        return False, [c for c in codes if c]
    raise GuardError(
        f"the guard model's answer ({len(text)} characters) is not 'safe' or 'unsafe\\nS<n>'; "
        "is it a Llama Guard model?"
    )


def llama_guard_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """The chat as Llama Guard's template takes it: user and assistant turns only, alternating,
    starting with the user (neighbours of one role are joined)."""
    turns: list[dict[str, str]] = []
    for message in messages:
        role = message.get("role")
        if role not in ("user", "assistant"):
            continue
        content = clip(message.get("content") or "")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + content
        elif turns or role == "user":
            turns.append({"role": role, "content": content})
    if not turns:
        raise GuardError("there is no user message for the guard model to check")
    return turns


class LlamaGuard:
    """A guard model served by vLLM's OpenAI-compatible server (Llama Guard 3 and the like):
    the chat goes in as it is (the model's chat template builds the classification prompt, and
    classifies the last turn), the answer is parsed as Llama Guard's documented output."""

    def __init__(
        self,
        url: str | None = None,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        name: str = "llama-guard",
        client: ChatModel | None = None,
        categories: dict[str, str] | None = None,
    ) -> None:
        if client is None and not url:
            raise GuardError("LlamaGuard needs the URL of the server that serves the guard model")
        self.client: ChatModel = client or OpenAIChatModel(
            url or "", api_key=api_key, model=model, timeout_s=timeout_s, max_retries=1
        )
        self.name = name
        self.categories = categories or LLAMA_GUARD_CATEGORIES

    def check(self, messages: Sequence[Message], stage: Stage) -> Verdict:
        started = time.perf_counter()
        done = self.client.complete(llama_guard_messages(messages), max_tokens=20, temperature=0.0)
        safe, codes = parse_llama_guard(done.text)
        category = ", ".join(self.categories.get(c, c) for c in codes) or (
            None if safe else "other"
        )
        return Verdict(safe, category, self.name, stage, None, time.perf_counter() - started,
                       done.usage)  # fmt: skip


GuardFunction = Callable[[str, Stage], "bool | str | None | Verdict"]


class CallableGuard:
    """Any function ``f(text, stage)`` of the last message's text: it returns ``None`` or
    ``True`` for safe, a category string or ``False`` for unsafe, or a whole ``Verdict``."""

    def __init__(self, function: GuardFunction, name: str | None = None) -> None:
        self.function = function
        self.name = name or getattr(function, "__name__", "callable")

    def check(self, messages: Sequence[Message], stage: Stage) -> Verdict:
        started = time.perf_counter()
        text = messages[-1].get("content", "") if messages else ""
        answer = self.function(text, stage)
        elapsed = time.perf_counter() - started
        if isinstance(answer, Verdict):
            return answer
        if answer is None or answer is True:
            return Verdict(True, None, self.name, stage, latency_s=elapsed)
        if answer is False:
            return Verdict(False, "other", self.name, stage, latency_s=elapsed)
        if isinstance(answer, str):
            return Verdict(False, answer, self.name, stage, latency_s=elapsed)
        raise GuardError(
            f"guard {self.name} returned {type(answer).__name__}; return None/True (safe), "
            "a category or False (unsafe), or a Verdict"
        )
