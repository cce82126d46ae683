"""PAL, program-aided answers (Gao et al. 2022), in the paper's six steps.

1. a few-shot prompt of ``def solution():`` programs with the reasoning as comments
   (``prompts/pal_gsm8k.txt``); 2. the model writes a program; 3. we extract the code;
4. run it in the sandbox; 5. its result is the answer; 6. optionally the model states it in
words with the result in context. ``samples=k`` draws k programs and takes the majority result
(self-consistency); a failing program can be shown its error once and repaired.

    answer = PAL(model).solve("A pen costs $3 and a book 4 times as much. Total for both?")
    answer.value, answer.program, answer.result.stdout
"""

from __future__ import annotations

import ast
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agentkit import tracing
from agentkit.llm import ChatModel, Message, Usage
from agentkit.prompts import load_messages
from agentkit.tools.sandbox import Sandbox, SandboxResult

FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.I)
CODE_START = re.compile(r"^(def |import |from |class |@|[A-Za-z_]\w* *=)", re.M)


class NoCode(ValueError):
    """The model's reply holds no program we can run."""


def extract_code(reply: str, entry: str = "solution") -> str:
    """The program in a model reply: fenced or not, with prose around it."""
    blocks = [b.strip("\n") for b in FENCE.findall(reply) if b.strip()]
    if not blocks:
        start = CODE_START.search(reply)
        if start is None:
            raise NoCode("the model's reply contains no Python program")
        blocks = [reply[start.start() :]]
    with_entry = [b for b in blocks if re.search(rf"^\s*def {entry}\s*\(", b, re.M)]
    code = with_entry[0] if with_entry else blocks[0]
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):  # drop trailing prose until it parses
        candidate = "\n".join(lines[:end])
        try:
            ast.parse(candidate)
            return candidate
        except SyntaxError:
            continue
    return code  # the sandbox will report the syntax error with its line


@dataclass
class Sample:
    reply: str
    program: str | None
    result: SandboxResult
    repaired: bool = False


@dataclass
class PALAnswer:
    question: str
    value: Any  # the majority result; None when every program failed
    text: str  # the answer in words (step 6) or the value as text
    program: str | None  # a program that produced ``value``
    result: SandboxResult
    samples: list[Sample] = field(default_factory=list)
    votes: dict[str, int] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.value is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.value,
            "text": self.text,
            "program": self.program,
            "stdout": self.result.stdout,
            "error": self.result.error,
            "error_type": self.result.error_type,
            "votes": self.votes,
            "samples": len(self.samples),
            "repaired": any(s.repaired for s in self.samples),
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
            },
            "timings": self.timings,
        }


def vote_key(value: Any) -> str:
    """Results that are the same number vote together (4 == 4.0 == 4.0000000001)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return repr(value)
    return repr(round(float(value), 6)).removesuffix(".0")


class PAL:
    """Program-aided answers with any ``ChatModel`` and a ``Sandbox``."""

    def __init__(
        self,
        model: ChatModel,
        sandbox: Sandbox | None = None,
        *,
        samples: int = 1,
        temperature: float | None = None,
        max_tokens: int = 400,
        repair: bool = True,
        explain: bool = False,
        prompt: str = "pal_gsm8k",
    ) -> None:
        self.model, self.sandbox = model, sandbox or Sandbox()
        self.samples, self.max_tokens, self.repair, self.explain = (
            samples,
            max_tokens,
            repair,
            explain,
        )
        self.temperature = (
            temperature if temperature is not None else (0.0 if samples == 1 else 0.7)
        )
        self.prompt = prompt

    def _run(
        self, reply: str, cancel: threading.Event | None = None
    ) -> tuple[str | None, SandboxResult]:
        try:
            program = extract_code(reply)
        except NoCode as error:
            return None, SandboxResult(error=str(error), error_type="no_code")
        with tracing.span("sandbox_run") as traced:
            if tracing.capture_content():
                traced.set("agentkit.sandbox.program", program, tracing.MAX_CONTENT_CHARS)
            result = self.sandbox.run(program, cancel=cancel)
            traced.set("agentkit.sandbox.outcome", result.error_type or "ok")
            traced.set("agentkit.sandbox.duration_ms", result.duration_ms)
            traced.set("agentkit.sandbox.isolation", result.isolation)
        return program, result

    def solve(self, question: str, cancel: threading.Event | None = None) -> PALAnswer:
        """Answer ``question``; setting ``cancel`` (a client went away) stops sandbox runs."""
        with tracing.agent_span("agentkit-pal", question) as run:
            answer = self._solve(question, cancel)
            run.set("agentkit.pal.ok", answer.ok)
            run.set("agentkit.pal.samples", len(answer.samples))
            run.set("gen_ai.usage.input_tokens", answer.usage.prompt_tokens)
            run.set("gen_ai.usage.output_tokens", answer.usage.completion_tokens)
            return answer

    def _solve(self, question: str, cancel: threading.Event | None) -> PALAnswer:
        started = time.perf_counter()
        messages: list[Message] = load_messages(self.prompt, question=question)
        completion = tracing.complete(
            self.model,
            messages,
            n=self.samples,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        usage = Usage() + completion.usage
        generated = time.perf_counter()
        samples = []
        for reply in completion.texts:
            program, result = self._run(reply, cancel)
            sample = Sample(reply, program, result)
            if result.error_type == "cancelled":
                samples.append(sample)
                break
            if not result.ok and self.repair and result.error_type != "no_code":
                fix = [
                    *messages,
                    {"role": "assistant", "content": reply},
                    *load_messages("pal_repair", error=result.error),
                ]
                again = tracing.complete(
                    self.model, fix, temperature=0.0, max_tokens=self.max_tokens
                )
                usage += again.usage
                repaired_program, repaired_result = self._run(again.text, cancel)
                if repaired_result.ok:
                    sample = Sample(again.text, repaired_program, repaired_result, repaired=True)
            samples.append(sample)
        executed = time.perf_counter()
        good = [s for s in samples if s.result.ok and s.result.value is not None]
        votes = Counter(vote_key(s.result.value) for s in good)
        if good:
            winner_key = votes.most_common(1)[0][0]
            best = next(s for s in good if vote_key(s.result.value) == winner_key)
        else:
            best = samples[0]
        value = best.result.value if good else None
        text = "" if value is None else str(value)
        if self.explain and value is not None:
            words = tracing.complete(
                self.model,
                load_messages("pal_explain", question=question, result=value),
                temperature=0.0,
                max_tokens=80,
            )
            text = words.text.strip()
            usage += words.usage
        return PALAnswer(
            question=question,
            value=value,
            text=text,
            program=best.program,
            result=best.result,
            samples=samples,
            votes=dict(votes),
            usage=usage,
            timings={
                "generate_s": generated - started,
                "execute_s": executed - generated,
                "total_s": time.perf_counter() - started,
            },
        )
