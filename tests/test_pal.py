"""PAL with the scripted model and the real sandbox: extraction, repair, voting, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentkit.evaluation import eval_gsm8k, gold_number, last_number
from agentkit.pal import PAL, NoCode, extract_code, vote_key
from agentkit.testing import ScriptedChatModel
from agentkit.tools.sandbox import Sandbox

PROGRAM = "def solution():\n    # two boxes of 3\n    return 2 * 3"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(timeout_s=2) as box:
        yield box


@pytest.mark.parametrize(
    "reply",
    [
        f"```python\n{PROGRAM}\n```",
        f"Here is the program:\n```python\n{PROGRAM}\n```\nIt returns 6.",
        f"```\n{PROGRAM}\n```",
        f"{PROGRAM}\n\nThis program multiplies the boxes.",
        f"Sure!\n{PROGRAM}",
        f"```python\nimport math\n```\n```python\n{PROGRAM}\n```",
        f"```python\n{PROGRAM}\n",  # cut off before the closing fence
    ],
)
def test_code_is_extracted_fenced_or_not_with_prose_around(reply: str) -> None:
    assert extract_code(reply).strip() == PROGRAM


def test_a_reply_without_code_is_a_clear_no_code_result(sandbox: Sandbox) -> None:
    with pytest.raises(NoCode):
        extract_code("I think the answer is six.")
    answer = PAL(ScriptedChatModel(["I think the answer is six."]), sandbox).solve("q")
    assert not answer.ok and answer.result.error_type == "no_code"


def test_the_six_steps_give_the_programs_result(sandbox: Sandbox) -> None:
    model = ScriptedChatModel([f"```python\n{PROGRAM}\n```", "There are 6 eggs."])
    answer = PAL(model, sandbox, explain=True).solve("How many eggs?")
    assert answer.value == 6 and answer.program == PROGRAM and answer.text == "There are 6 eggs."
    prompt = model.calls[0].messages
    assert prompt[0]["role"] == "system" and "def solution():" in prompt[2]["content"]
    assert prompt[-1] == {"role": "user", "content": "How many eggs?"}
    assert "6" in model.calls[1].messages[-1]["content"]  # the result is in context for step 6
    assert answer.timings["execute_s"] > 0


def test_an_execution_error_is_fed_back_once_for_a_repair(sandbox: Sandbox) -> None:
    broken = "def solution():\n    return eggs * 2"
    model = ScriptedChatModel([broken, "def solution():\n    eggs = 3\n    return eggs * 2"])
    answer = PAL(model, sandbox).solve("q")
    assert answer.value == 6 and answer.samples[0].repaired
    feedback = model.calls[1].messages
    assert feedback[-2] == {"role": "assistant", "content": broken}
    assert "NameError: name 'eggs' is not defined (line 2)" in feedback[-1]["content"]


def test_without_repair_the_error_is_the_answer(sandbox: Sandbox) -> None:
    model = ScriptedChatModel(["def solve():\n    return 1"])
    answer = PAL(model, sandbox, repair=False).solve("q")
    assert not answer.ok and answer.result.error_type == "no_entry"
    assert "def solution()" in answer.result.error and len(model.calls) == 1


def test_self_consistency_takes_the_majority_result(sandbox: Sandbox) -> None:
    replies = iter(
        [
            "def solution():\n    return 4",
            "def solution():\n    return 4.0",
            "def solution():\n    return 5",
            "def solution():\n    return 1/0",
        ]
    )
    model = ScriptedChatModel(lambda messages, **kw: next(replies))
    answer = PAL(model, sandbox, samples=4, repair=False).solve("q")
    assert answer.value == 4 and answer.votes == {"4": 2, "5": 1}
    assert model.calls[0].kwargs["n"] == 4 and model.calls[0].kwargs["temperature"] == 0.7


def test_vote_keys_merge_equal_numbers() -> None:
    assert vote_key(4) == vote_key(4.0) == vote_key(4.0000000001) != vote_key(4.1)
    assert vote_key("4") != vote_key(4) and vote_key(True) != vote_key(1)


def test_gsm8k_scoring_helpers() -> None:
    assert gold_number("... so 1,234 eggs.\n#### 1,234") == 1234
    assert last_number("3 + 4 = 7 cups.\nThe answer is 1,250.5.") == 1250.5
    assert last_number("no numbers") is None


def test_eval_gsm8k_counts_accuracy_and_errors(tmp_path: Path) -> None:
    data = tmp_path / "g.jsonl"
    rows = [
        {"question": "a", "answer": "#### 6"},
        {"question": "b", "answer": "#### 7"},
        {"question": "c", "answer": "#### 1"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    replies = {
        "a": PROGRAM,
        "b": "def solution():\n    return 8",
        "c": "def solution():\n    while True: pass",
    }
    model = ScriptedChatModel(lambda m, **kw: replies.get(m[-1]["content"], "no code here"))
    report = eval_gsm8k(model, data, mode="pal")
    assert (report["n"], report["accuracy"]) == (3, pytest.approx(1 / 3))
    assert report["timeouts"] == 1 and [r["correct"] for r in report["records"]] == [
        True,
        False,
        False,
    ]
    cot = ScriptedChatModel(lambda m, **kw: "So 6.\nThe answer is 6.")
    assert eval_gsm8k(cot, data, mode="cot", limit=2)["accuracy"] == 0.5


def test_hotpotqa_scoring_uses_the_standard_normalisation() -> None:
    from agentkit.evaluation import f1_score, normalize_answer

    assert normalize_answer("The  Beatles!") == "beatles"
    assert f1_score("the Beatles", "Beatles") == 1.0
    assert f1_score("San Juan", "San Juan, San Luis and Mendoza") == pytest.approx(0.5)
    assert f1_score("yes", "no") == 0.0 and f1_score("no", "no") == 1.0


def test_eval_hotpotqa_reports_every_summary_key(tmp_path: Path, settings, embedder, monkeypatch):
    from agentkit import Index
    from agentkit.evaluation import eval_hotpotqa

    rows = [
        {
            "question": "Who led the raid?",
            "answer": "James Andrews",
            "context": [["Raid", ["The raid was led by James Andrews."]], ["Other", ["Filler."]]],
        }
    ]
    data = tmp_path / "h.jsonl"
    data.write_text(json.dumps(rows[0]))
    original = Index.open_or_create.__func__

    def with_fake_embedder(cls, path=None, **kw):
        return original(cls, path, settings=settings, embedder=embedder)

    monkeypatch.setattr(Index, "open_or_create", classmethod(with_fake_embedder))
    model = ScriptedChatModel(
        ["Thought: t\nAction: search[Raid]", "Thought: t\nAction: finish[James Andrews]"]
    )
    report = eval_hotpotqa(model, data, tmp_path / "idx", mode="react")
    assert {
        "exact_match",
        "f1",
        "parse_failures",
        "tool_errors",
        "fallbacks",
        "mean_steps",
        "mean_latency_s",
        "records",
    } <= set(report)
    assert report["exact_match"] == 1.0 and report["mean_steps"] == 2 and report["fallbacks"] == 0
