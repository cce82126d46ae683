"""Server-side conversation history (SQLite), trimmed to the model's token budget on use."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from agentkit.llm import ChatModel, Message

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, conversation_id TEXT NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


class ConversationStore:
    def __init__(self, path: Path | str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def history(self, conversation_id: str) -> list[Message]:
        with self._lock:
            rows = self._db.execute(
                "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        return [{"role": role, "content": content} for role, content in rows]

    def append(self, conversation_id: str, messages: list[Message]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO messages (conversation_id, role, content, created) VALUES (?,?,?,?)",
                [(conversation_id, m["role"], m["content"], time.time()) for m in messages],
            )


def trim_to_budget(
    model: ChatModel, history: list[Message], new: list[Message], max_tokens: int
) -> list[Message]:
    """``history + new``, dropping the oldest history turns until it fits the context."""
    context = model.context_length()
    while history and model.count_tokens(history + new) + max_tokens > context:
        history = history[2:] if len(history) > 1 else []
    return history + new
