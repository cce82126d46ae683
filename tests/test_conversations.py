"""ConversationStore: owners kept apart, bounded history and storage; trim_to_budget's cost
does not grow with the conversation."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agentkit.errors import AgentkitError
from agentkit.services.conversations import ConversationNotFound, ConversationStore, trim_to_budget
from agentkit.testing import ScriptedChatModel


class CountingModel(ScriptedChatModel):
    """Counts calls to count_tokens (each one is a /tokenize request to vLLM)."""

    def __init__(self, context_length: int) -> None:
        super().__init__([], context_length=context_length)
        self.token_counts = 0

    def count_tokens(self, messages) -> int:
        self.token_counts += 1
        return super().count_tokens(messages)


def turn(i: int) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"question {i} " + "word " * (i % 7)},
        {"role": "assistant", "content": f"answer {i}"},
    ]


def old_trim(model, history, new, max_tokens):
    """The previous trim_to_budget, one count per dropped turn: the reference result."""
    while history and model.count_tokens(history + new) + max_tokens > model.context_length():
        history = history[2:] if len(history) > 1 else []
    return history + new


def test_a_conversation_belongs_to_its_first_writer(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.sqlite")
    assert store.owner_of("c1") is None and store.history("c1", owner="alice") == []
    store.append("c1", turn(1), owner="alice")
    assert store.owner_of("c1") == "alice"
    assert store.history("c1", owner="alice") == turn(1)
    with pytest.raises(ConversationNotFound) as refused:
        store.history("c1", owner="bob")
    assert isinstance(refused.value, AgentkitError) and "c1" in str(refused.value)
    with pytest.raises(ConversationNotFound):
        store.append("c1", turn(2), owner="bob")
    assert store.history("c1", owner="alice") == turn(1)  # bob's append stored nothing
    assert store.history("c1") == turn(1)  # owner=None: no check (in process, admins)
    store.append("c1", turn(2), owner="alice")
    assert store.history("c1", owner="alice") == turn(1) + turn(2)


def test_racing_first_writers_get_one_owner(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.sqlite")

    def claim(owner: str) -> bool:
        try:
            store.append("shared", turn(0), owner=owner)
            return True
        except ConversationNotFound:
            return False

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(claim, [f"key{i % 4}" for i in range(64)]))
    owner = store.owner_of("shared")
    assert owner is not None
    assert won == [f"key{i % 4}" == owner for i in range(64)]
    assert len(store.history("shared")) == 2 * won.count(True)


def test_conversations_from_before_owners_are_kept_but_owned_by_nobody(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id TEXT NOT NULL, "
            "role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL);"
            "INSERT INTO messages (conversation_id, role, content, created) "
            "VALUES ('old', 'user', 'hello', 0);"
        )
    store = ConversationStore(path)
    assert store.history("old") == [{"role": "user", "content": "hello"}]
    assert store.transcript("old") == [{"role": "user", "content": "hello"}]  # columns added
    with pytest.raises(ConversationNotFound):  # no key can claim it and read what it held
        store.history("old", owner="alice")
    with pytest.raises(ConversationNotFound):
        store.append("old", turn(1), owner="alice")


def test_an_answer_keeps_its_agent_and_what_it_showed_for_the_transcript(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.sqlite")
    shown = {"citations": [{"number": 1, "source": "a.md"}], "steps": [{"thought": "t"}]}
    store.append(
        "c",
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a [1]", "agent": "agentkit-rag", "agentkit": shown},
        ],
        owner="alice",
    )
    store.append(
        "c", [{"role": "assistant", "content": "x" * 10, "agentkit": {"big": "y" * 300_000}}]
    )
    assert store.history("c", owner="alice") == [  # what the model reads: text only
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a [1]"},
        {"role": "assistant", "content": "x" * 10},
    ]
    assert store.transcript("c", owner="alice") == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a [1]", "agent": "agentkit-rag", "agentkit": shown},
        {"role": "assistant", "content": "x" * 10},  # too large to keep: the text stays
    ]
    with pytest.raises(ConversationNotFound):
        store.transcript("c", owner="bob")
    with pytest.raises(ConversationNotFound):
        store.transcript("never", owner="alice")


def test_history_returns_the_last_messages_and_storage_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    store = ConversationStore(path, max_messages=10, keep_messages=30)
    for i in range(100):
        store.append("long", turn(i), owner="alice")
        if i < 3:
            store.append("short", turn(i), owner="bob")
    assert store.history("long", owner="alice") == [m for i in range(95, 100) for m in turn(i)]
    assert store.history("short", owner="bob") == [m for i in range(3) for m in turn(i)]
    stored = dict(
        sqlite3.connect(path).execute(
            "SELECT conversation_id, count(*) FROM messages GROUP BY conversation_id"
        )
    )
    assert stored == {"long": 30, "short": 6}
    assert ConversationStore(path).keep_messages == 4 * 64  # the default bound


def test_trim_keeps_the_same_messages_as_dropping_turn_by_turn() -> None:
    new = [{"role": "user", "content": "now " * 5}]
    for length in [0, 1, 2, 3, 7, 20, 41, 128]:
        history = [m for i in range(length) for m in turn(i)][:length]
        for context in [10, 40, 60, 200, 5000]:
            expected = old_trim(ScriptedChatModel([], context_length=context), history, new, 20)
            kept = trim_to_budget(ScriptedChatModel([], context_length=context), history, new, 20)
            assert kept == expected, (length, context)


def test_trim_costs_a_few_token_counts_however_long_the_conversation() -> None:
    new = [{"role": "user", "content": "now"}]
    costs = {}
    for turns in [10, 100, 400]:
        model = CountingModel(context_length=200)
        history = [m for i in range(turns) for m in turn(i)]
        kept = trim_to_budget(model, history, new, max_tokens=50)
        assert model.count_tokens(kept) <= 150 and kept[-1] == new[0]
        costs[turns] = model.token_counts - 1
    assert costs[400] <= 1 + 9  # 400 turns: one check, then a bisection over 400 boundaries
    fits = CountingModel(context_length=100_000)
    trim_to_budget(fits, [m for i in range(400) for m in turn(i)], new, max_tokens=50)
    assert fits.token_counts == 1


def test_a_request_costs_the_same_after_400_turns_as_after_10(tmp_path: Path) -> None:
    """History is read bounded, so a long conversation costs what a short one does."""
    store = ConversationStore(tmp_path / "c.sqlite", max_messages=16)
    new = [{"role": "user", "content": "now"}]
    costs = {}
    for turns in [10, 400]:
        conversation = f"c{turns}"
        for i in range(turns):
            store.append(conversation, turn(i), owner="alice")
        model = CountingModel(context_length=120)
        history = store.history(conversation, owner="alice")
        assert len(history) == min(16, 2 * turns)
        trim_to_budget(model, history, new, max_tokens=20)
        costs[turns] = model.token_counts
    assert costs[400] == costs[10] <= 1 + 4
