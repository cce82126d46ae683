"""Guardrails through the REST API: the server's guards (AGENTKIT_GUARD*), a request's
best_of and revise, what the `agentkit` field and /metrics show, and the export by kind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agentkit.services.api import create_app
from agentkit.services.feedback import FeedbackStore
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel

UNSAFE_ANSWER = "Mix the precursors at 80 degrees."


def model_for(input_verdict: str = "safe", output_verdict: str = "safe") -> ScriptedChatModel:
    answers = iter(["short", "a much longer answer", "medium answer"] * 10)

    def reply(messages: list[dict[str, str]], **kwargs: object) -> str:
        system, last = messages[0]["content"], messages[-1]["content"]
        if "Classify the" in system:
            return input_verdict if "user's message" in system else output_verdict
        if "grade an AI assistant's answer" in system:
            graded = last.split("Answer:\n")[-1].split("\n\nGrade")[0]
            return str(min(9, len(graded.split())))
        if "review an AI assistant's answer" in system:
            return "It states a dangerous procedure."
        if "critique found a real problem" in system:
            return "yes"
        if "rewrite an AI assistant's answer" in system:
            return "I can explain the chemistry in general terms only."
        if kwargs.get("n", 1) > 1 or kwargs.get("temperature") == 0.8:
            return next(answers)
        return UNSAFE_ANSWER if "chemistry" in last else "Hello!"

    return ScriptedChatModel(reply)


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator:
    stores: list[FeedbackStore] = []

    def make(model: ScriptedChatModel, **settings: object) -> TestClient:
        store = FeedbackStore(tmp_path / f"feedback{len(stores)}.sqlite")
        stores.append(store)
        configured = Settings(cache_dir=tmp_path / "cache", **settings)
        client = TestClient(create_app(model, feedback=store, settings=configured))
        client.store = store  # type: ignore[attr-defined]
        return client

    yield make
    for store in stores:
        store.close()


def chat(client: TestClient, question: str, **body: object) -> dict:
    response = client.post(
        "/v1/chat/completions",
        json={"model": "served", "messages": [{"role": "user", "content": question}], **body},
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_blocked_request_gets_a_polite_refusal_and_is_counted(make_client) -> None:
    client = make_client(model_for(input_verdict="unsafe: weapons"), guard="input")
    reply = chat(client, "How do I build a bomb?")
    assert reply["choices"][0]["message"]["content"].startswith("I'm sorry")
    assert reply["agentkit"]["guardrails"]["action"] == "blocked"
    metrics = client.get("/metrics").text
    assert 'agentkit_guardrail_actions_total{action="blocked"} 1.0' in metrics
    assert 'agentkit_guard_verdicts_total{stage="input",verdict="unsafe"} 1.0' in metrics


def test_a_flagged_answer_is_answered_and_marked(make_client) -> None:
    client = make_client(
        model_for(input_verdict="unsafe: hate"), guard="input", guard_policy="flag"
    )
    reply = chat(client, "hello")
    assert reply["choices"][0]["message"]["content"] == "Hello!"
    assert reply["agentkit"]["guardrails"]["action"] == "flagged"
    assert 'agentkit_guardrail_actions_total{action="flagged"} 1.0' in client.get("/metrics").text


def test_a_revised_answer_carries_the_critique_and_the_original(make_client) -> None:
    client = make_client(
        model_for(output_verdict="unsafe: crime"), guard="output", guard_policy="revise"
    )
    reply = chat(client, "Tell me some chemistry")
    rails = reply["agentkit"]["guardrails"]
    assert reply["choices"][0]["message"]["content"].startswith("I can explain")
    assert rails["action"] == "revised" and rails["original"] == UNSAFE_ANSWER
    assert rails["critique"] == "It states a dangerous procedure."


def test_a_request_asks_for_revision_itself(make_client) -> None:
    client = make_client(model_for())
    reply = chat(client, "Tell me some chemistry", revise=True)
    assert reply["agentkit"]["guardrails"]["original"] == UNSAFE_ANSWER
    assert "guardrails" not in chat(client, "Tell me some chemistry").get("agentkit", {})


def test_streaming_with_an_output_guard_sends_the_checked_answer_once(make_client) -> None:
    client = make_client(model_for(output_verdict="unsafe: crime"), guard="output")
    body = {"model": "served", "stream": True,
            "messages": [{"role": "user", "content": "Tell me some chemistry"}]}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")
        ]
    texts = [e["choices"][0]["delta"].get("content") for e in events if e.get("choices")]
    texts = [t for t in texts if t]
    assert len(texts) == 1 and UNSAFE_ANSWER not in texts[0]
    assert any(e.get("agentkit", {}).get("guardrails", {}).get("action") == "blocked"
               for e in events)  # fmt: skip


def test_best_of_returns_the_answer_the_judge_grades_highest(make_client) -> None:
    client = make_client(model_for())
    reply = chat(client, "Say something", best_of=3)
    best = reply["agentkit"]["guardrails"]["best_of"]
    assert reply["choices"][0]["message"]["content"] == "a much longer answer"
    assert best["n"] == 3 and best["chosen"] == 1 and best["reward"] == "judge"
    body = {"model": "served", "messages": [{"role": "user", "content": "x"}], "n": 2}
    response = client.post("/v1/chat/completions", json={**body, "best_of": 2})
    assert response.status_code == 400


def test_export_by_kind_and_ai_labelers_are_reserved(make_client) -> None:
    client = make_client(model_for())
    human = {"prompt": "p", "ranking": ["good", "bad"], "labeler": "ann"}
    assert client.post("/v1/feedback", json=human).status_code == 200
    forged = {**human, "labeler": "ai:gpt"}
    assert client.post("/v1/feedback", json=forged).status_code == 400
    client.store.add_rankings(
        [{"prompt": "q", "ranking": ["kind", "rude"], "labeler": "ai:judge", "ties": []}]
    )
    exported = {
        kind: client.get(f"/v1/feedback/export?format=pairwise&kind={kind}").text
        for kind in ("human", "ai", "all")
    }
    assert json.loads(exported["human"]) == {"prompt": "p", "chosen": "good", "rejected": "bad"}
    assert json.loads(exported["ai"]) == {"prompt": "q", "chosen": "kind", "rejected": "rude"}
    assert exported["all"] == exported["human"] + exported["ai"]
    assert client.get("/v1/feedback/export?kind=robots").status_code == 400
