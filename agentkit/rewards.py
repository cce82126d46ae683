"""Rewards for best-of-n: score each sampled answer, keep the best.

- ``JudgeReward``: the served model grades each answer 1–9 by the constitution (one constrained
  digit per answer; a grade that does not parse, from a server without structured outputs,
  scores 0 and is counted as unscored);
- ``RewardModel``: a reward model served by vLLM's pooling API (``POST /pooling`` with the chat;
  the score is the last value of the pooled output);
- ``CallableReward``: any function ``f(question, answer) -> float``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx

from agentkit.constitution import Constitution, load_constitution
from agentkit.errors import GuardError, ModelServerError
from agentkit.llm import ChatModel, Structured, Usage, normalize_url
from agentkit.prompts import load_messages

GRADES = [str(d) for d in range(1, 10)]


@dataclass
class Scores:
    values: list[float]
    usage: Usage = field(default_factory=Usage)
    unscored: int = 0  # answers the reward could not score (they got its lowest score)


@runtime_checkable
class Reward(Protocol):
    name: str

    def score(self, question: str, answers: Sequence[str]) -> Scores:
        """One score per answer, higher is better."""
        ...


def best_index(values: Sequence[float]) -> int:
    """The index of the highest score; the first one on a tie."""
    if not values:
        raise GuardError("there are no answers to choose from")
    return max(range(len(values)), key=lambda i: (values[i], -i))


class JudgeReward:
    def __init__(self, model: ChatModel, constitution: Constitution | None = None) -> None:
        self.model = model
        self.constitution = constitution or load_constitution()
        self.name = "judge"

    def score(self, question: str, answers: Sequence[str]) -> Scores:
        values, usage = [], Usage()
        for answer in answers:
            done = self.model.complete(
                load_messages(
                    "reward_judge",
                    principles=self.constitution.summary(),
                    question=question,
                    answer=answer,
                ),
                max_tokens=2,
                temperature=0.0,
                structured=Structured(choice=GRADES),
            )
            usage += done.usage
            digit = done.text.strip()[:1]
            values.append(float(digit) if digit in GRADES else 0.0)  # below every grade
        return Scores(values, usage, sum(v == 0.0 for v in values))


def parse_pooling_score(data: Any) -> float:
    """The reward in a vLLM ``/pooling`` response: ``data[0].data`` is a number, a list of
    numbers (one per label or token: the last counts) or a list of such lists."""
    try:
        value = data["data"][0]["data"]
        while isinstance(value, list):
            value = value[-1]
        return float(value)
    except (KeyError, IndexError, TypeError, ValueError):
        raise GuardError(
            f"the reward model's answer {str(data)[:120]!r} has no score; serve a reward model "
            "with vLLM (`--runner pooling`)"
        ) from None


class RewardModel:
    """A reward model served by vLLM: one ``/pooling`` request per answer, with the chat."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url, self.model, self.name = normalize_url(url), model, f"reward-model:{model}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=timeout_s, transport=transport)

    def request(self, question: str, answer: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ],
        }

    def score(self, question: str, answers: Sequence[str]) -> Scores:
        values = []
        for answer in answers:
            try:
                response = self._client.post(
                    self.url + "/pooling", json=self.request(question, answer)
                )
            except httpx.TransportError as error:
                raise ModelServerError(
                    f"no reward model server at {self.url} ({type(error).__name__}); check "
                    "AGENTKIT_REWARD_URL"
                ) from None
            if response.is_error:
                raise GuardError(
                    f"the reward model server answered {response.status_code}: "
                    f"{response.text[:200]}"
                )
            values.append(parse_pooling_score(response.json()))
        return Scores(values)

    def close(self) -> None:
        self._client.close()


class CallableReward:
    def __init__(self, function: Callable[[str, str], float], name: str | None = None) -> None:
        self.function = function
        self.name = name or getattr(function, "__name__", "callable")

    def score(self, question: str, answers: Sequence[str]) -> Scores:
        return Scores([float(self.function(question, a)) for a in answers])
