"""Server-side conversation history, bounded, owned, and trimmed to the token budget; in a SQLite
file or PostgreSQL (``services/storage.py``).

A conversation belongs to the owner (the API key's name) of its first ``append``; anyone else
gets ``ConversationNotFound``, exactly as for an id that does not exist. ``history()`` returns
at most the last ``max_messages`` messages and ``append()`` keeps at most ``keep_messages`` per
conversation, so neither reading nor trimming grows with the conversation's length.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agentkit.errors import AgentkitError
from agentkit.llm import ChatModel, Message
from agentkit.services.storage import (
    Connection,
    Database,
    Dialect,
    Migration,
    add_column,
    migrate,
    open_database,
    statements,
)


def answer_columns(db: Connection, dialect: Dialect) -> None:
    for column in ("agent", "data"):
        add_column("messages", column, "TEXT")(db, dialect)


MIGRATIONS = [
    Migration(
        1,
        "messages",
        statements(
            """CREATE TABLE IF NOT EXISTS messages (
    id {id}, conversation_id TEXT NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, created {real} NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id)",
        ),
    ),
    Migration(
        2,
        "owners; conversations from before owners are kept, owned by nobody",
        statements(
            "CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, owner TEXT, "
            "created {real} NOT NULL)",
            # only owner=None callers reach the adopted ones
            "INSERT INTO conversations (id, owner, created) SELECT conversation_id, NULL, "
            "min(created) FROM messages WHERE true GROUP BY conversation_id "
            "ON CONFLICT (id) DO NOTHING",
        ),
    ),
    Migration(
        3,
        "the agent of each answer and what it showed (citations, program, steps), as JSON",
        answer_columns,
    ),
]
MAX_DATA_CHARS = 200_000  # an answer's data kept with it; more is dropped (the text stays)


class ConversationNotFound(AgentkitError):
    """No conversation with this id belongs to the caller (it may not exist at all)."""

    def __init__(self, conversation_id: str) -> None:
        super().__init__(
            f"conversation {conversation_id!r} not found: "
            "start a new one with a conversation_id of your own"
        )
        self.conversation_id = conversation_id


class ConversationStore:
    def __init__(
        self,
        path: Database | Path | str,
        *,
        max_messages: int = 64,
        keep_messages: int | None = None,
    ) -> None:
        """``max_messages``: the most ``history()`` returns; ``keep_messages`` (default 4×that):
        the most stored per conversation, older messages are deleted on ``append()``."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.max_messages = max_messages
        self.keep_messages = max(keep_messages or 4 * max_messages, max_messages)
        self.database = open_database(path)
        self._owns_database = self.database is not path
        migrate(self.database, "conversations", MIGRATIONS)

    @staticmethod
    def _owner_row(db: Connection, conversation_id: str) -> tuple[str | None] | None:
        return db.execute(
            "SELECT owner FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()

    def owner_of(self, conversation_id: str) -> str | None:
        """The conversation's owner; None if it does not exist (or predates owners)."""
        with self.database.read() as db:
            row = self._owner_row(db, conversation_id)
        return row[0] if row else None

    def history(self, conversation_id: str, owner: str | None = None) -> list[Message]:
        """The last ``max_messages`` messages, oldest first; [] for a new conversation.

        ``owner=None`` skips the ownership check (in-process callers, admins); another owner's
        conversation raises ``ConversationNotFound``.
        """
        with self.database.snapshot() as db:
            row = self._owner_row(db, conversation_id)
            if row is not None and owner is not None and row[0] != owner:
                raise ConversationNotFound(conversation_id)
            rows = db.execute(
                "SELECT role, content FROM messages WHERE conversation_id = ? "
                "ORDER BY id DESC LIMIT ?",
                (conversation_id, self.max_messages),
            ).fetchall()
        return [{"role": role, "content": content} for role, content in reversed(rows)]

    def transcript(self, conversation_id: str, owner: str | None = None) -> list[dict[str, Any]]:
        """``history()`` as a person reads it again: each answer with its ``agent`` and its
        ``agentkit`` data (citations, PAL program, ReAct steps) where they were kept."""
        with self.database.snapshot() as db:
            row = self._owner_row(db, conversation_id)
            if row is None or (owner is not None and row[0] != owner):
                raise ConversationNotFound(conversation_id)
            rows = db.execute(
                "SELECT role, content, agent, data FROM messages WHERE conversation_id = ? "
                "ORDER BY id DESC LIMIT ?",
                (conversation_id, self.max_messages),
            ).fetchall()
        messages = []
        for role, content, agent, data in reversed(rows):
            message: dict[str, Any] = {"role": role, "content": content}
            if agent:
                message["agent"] = agent
            if data:
                message["agentkit"] = json.loads(data)
            messages.append(message)
        return messages

    def append(
        self, conversation_id: str, messages: list[dict[str, Any]], owner: str | None = None
    ) -> None:
        """Add messages; the first append makes ``owner`` the owner of the conversation. A
        message may carry the ``agent`` that wrote it and its ``agentkit`` data (``transcript``).

        Another owner's conversation raises ``ConversationNotFound`` and stores nothing.
        Messages beyond the newest ``keep_messages`` of the conversation are deleted.
        """
        now = time.time()
        with self.database.transaction() as db:
            db.execute(
                "INSERT INTO conversations (id, owner, created) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                (conversation_id, owner, now),
            )
            row = self._owner_row(db, conversation_id)
            if owner is not None and row is not None and row[0] != owner:
                raise ConversationNotFound(conversation_id)
            db.executemany(
                "INSERT INTO messages (conversation_id, role, content, created, agent, data) "
                "VALUES (?,?,?,?,?,?)",
                [
                    (conversation_id, m["role"], m["content"], now, m.get("agent"), data_of(m))
                    for m in messages
                ],
            )
            db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id <= ("
                "SELECT id FROM messages WHERE conversation_id = ? "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (conversation_id, conversation_id, self.keep_messages),
            )

    def summaries(self, owner: str | None, limit: int = 100) -> list[dict[str, object]]:
        """``owner``'s conversations (``None``: those no key owns), most recently used first:
        ``{id, title (the first user message, cut to 80 characters), messages, created,
        updated}``."""
        with self.database.read() as db:
            rows = db.execute(
                "SELECT c.id, c.created, count(m.id), max(m.created), (SELECT content FROM "
                "messages WHERE conversation_id = c.id AND role = 'user' ORDER BY id LIMIT 1) "
                "FROM conversations c JOIN messages m ON m.conversation_id = c.id "
                "WHERE c.owner IS NOT DISTINCT FROM ? "
                "GROUP BY c.id ORDER BY max(m.id) DESC LIMIT ?",
                (owner, limit),
            ).fetchall()
        return [
            {
                "id": id_,
                "title": " ".join((title or "").split())[:80],
                "messages": count,
                "created": created,
                "updated": updated,
            }
            for id_, created, count, updated, title in rows
        ]

    def delete(self, conversation_id: str, owner: str | None) -> None:
        """Delete the conversation and its messages; ``ConversationNotFound`` unless ``owner``
        owns it (``None``: a conversation no key owns)."""
        with self.database.transaction() as db:
            row = self._owner_row(db, conversation_id)
            if row is None or row[0] != owner:
                raise ConversationNotFound(conversation_id)
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def close(self) -> None:
        """Close the database unless it was handed in."""
        if self._owns_database:
            self.database.close()


def data_of(message: dict[str, Any]) -> str | None:
    """A message's ``agentkit`` data as stored: JSON, or None when absent or too large."""
    data = message.get("agentkit")
    if not data:
        return None
    text = json.dumps(data, ensure_ascii=False)
    return text if len(text) <= MAX_DATA_CHARS else None


def trim_to_budget(
    model: ChatModel, history: list[Message], new: list[Message], max_tokens: int
) -> list[Message]:
    """``history + new``, the oldest history turns (two messages) dropped until it fits.

    Keeps the longest tail that fits, found by bisection over the turn boundaries: one token
    count when everything fits, at most 1 + log2(len(history) / 2) otherwise (whole turns are
    dropped in the same steps as before, so the result is the same as dropping one at a time).
    """
    budget = model.context_length() - max_tokens

    def fits(start: int) -> bool:
        return model.count_tokens(history[start:] + new) <= budget

    if not history or fits(0):
        return history + new
    starts = [*range(2, len(history), 2), len(history)]  # the last: no history, not counted
    low, high = 0, len(starts) - 1
    while low < high:  # invariant: starts[high] fits (or keeps nothing), starts[low - 1] does not
        middle = (low + high) // 2
        if fits(starts[middle]):
            high = middle
        else:
            low = middle + 1
    return history[starts[low] :] + new
