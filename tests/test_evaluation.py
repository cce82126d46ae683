"""Evaluation helpers: citation markers out of the scores, concurrent problems in order."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from agentkit.errors import AgentkitError, ModelServerError
from agentkit.evaluation import (
    eval_gsm8k,
    f1_score,
    map_in_order,
    normalize_answer,
    strip_citations,
)
from agentkit.testing import ScriptedChatModel


def test_citation_markers_do_not_cost_exact_match() -> None:
    assert normalize_answer("Some Title [4].") == normalize_answer("Some Title")
    assert normalize_answer("Paris [1][3]") == "paris"
    assert normalize_answer("Paris [1, 2]; Lyon [3]") == "paris lyon"
    assert f1_score("The Beatles [2].", "Beatles") == 1.0
    assert strip_citations("in 1984 [12].") == "in 1984."


def test_brackets_that_are_not_citations_stay() -> None:
    assert normalize_answer("[b] side") == "b side"
    assert normalize_answer("1984") == "1984"


def test_map_in_order_returns_results_in_item_order_when_they_finish_backwards() -> None:
    items = list(range(4))
    finished = [threading.Event() for _ in items]

    def score(item: int) -> int:
        if item + 1 < len(items):  # each item waits for the next one: the last finishes first
            assert finished[item + 1].wait(10), "items did not run concurrently"
        finished[item].set()
        return item * 10

    seen: list[tuple[int, int]] = []
    results = map_in_order(score, items, concurrency=4, progress=lambda i, n: seen.append((i, n)))
    assert results == [0, 10, 20, 30]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_map_in_order_rejects_a_concurrency_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        map_in_order(str, [1], concurrency=0)


def test_eval_gsm8k_sends_concurrency_requests_at_once(tmp_path: Path) -> None:
    data = tmp_path / "g.jsonl"
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    all_in_flight = threading.Barrier(4, timeout=10)

    def reply(messages: list[dict[str, str]], **options: object) -> str:
        all_in_flight.wait()  # breaks (and fails the test) unless 4 requests are open together
        question = messages[-1]["content"]
        return f"The answer is {question[-1] if question != 'q2' else 99}."

    model = ScriptedChatModel(reply)
    report = eval_gsm8k(model, data, mode="cot", concurrency=4)
    assert [r["question"] for r in report["records"]] == ["q0", "q1", "q2", "q3"]
    assert [r["correct"] for r in report["records"]] == [True, True, False, True]
    assert report["accuracy"] == 0.75 and report["concurrency"] == 4
    assert report["problems_per_minute"] > 0


def test_eval_gsm8k_start_and_limit_pick_a_range_of_rows(tmp_path: Path) -> None:
    data = tmp_path / "g.jsonl"
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    model = ScriptedChatModel(
        lambda messages, **kw: f"The answer is {messages[-1]['content'][-1]}."
    )
    report = eval_gsm8k(model, data, mode="cot", start=2, limit=3)
    assert [r["question"] for r in report["records"]] == ["q2", "q3", "q4"]
    assert report["items"] == [2, 5] and report["accuracy"] == 1.0
    with pytest.raises(AgentkitError, match="past the end"):
        eval_gsm8k(model, data, mode="cot", start=6)


def test_a_model_call_that_fails_loses_its_problem_not_the_evaluation(tmp_path: Path) -> None:
    data = tmp_path / "g.jsonl"
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)]
    data.write_text("\n".join(json.dumps(r) for r in rows))

    def reply(messages: list[dict[str, str]], **kw: object) -> str:
        if messages[-1]["content"].endswith("q1"):
            raise ModelServerError("the model server did not answer within 300 s")
        return f"The answer is {messages[-1]['content'][-1]}."

    report = eval_gsm8k(ScriptedChatModel(reply), data, mode="cot", concurrency=2)
    assert [r["correct"] for r in report["records"]] == [True, False, True]
    assert report["model_errors"] == 1 and report["execution_errors"] == 0
    assert "300 s" in report["records"][1]["error"]

    def down(messages: list[dict[str, str]], **kw: object) -> str:
        raise ModelServerError("no model server at http://127.0.0.1:1")

    with pytest.raises(ModelServerError, match="every model call failed.*no model server"):
        eval_gsm8k(ScriptedChatModel(down), data, mode="cot")
