"""Server-side conversation history (SQLite), bounded, owned, and trimmed to the token budget.

A conversation belongs to the owner (the API key's name) of its first ``append``; anyone else
gets ``ConversationNotFound``, exactly as for an id that does not exist. ``history()`` returns
at most the last ``max_messages`` messages and ``append()`` keeps at most ``keep_messages`` per
conversation, so neither reading nor trimming grows with the conversation's length.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

from agentkit.errors import AgentkitError
from agentkit.llm import ChatModel, Message
from agentkit.services.feedback import use_wal, when_free, write_transaction

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, conversation_id TEXT NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, created REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id)",
]
OWNERS = "CREATE TABLE conversations (id TEXT PRIMARY KEY, owner TEXT, created REAL NOT NULL)"
# Conversations from before owners: kept, owned by nobody (only owner=None callers reach them).
ADOPT_UNOWNED = """INSERT OR IGNORE INTO conversations (id, owner, created)
    SELECT conversation_id, NULL, min(created) FROM messages GROUP BY conversation_id"""


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
        self, path: Path | str, *, max_messages: int = 64, keep_messages: int | None = None
    ) -> None:
        """``max_messages``: the most ``history()`` returns; ``keep_messages`` (default 4×that):
        the most stored per conversation, older messages are deleted on ``append()``."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.max_messages = max_messages
        self.keep_messages = max(keep_messages or 4 * max_messages, max_messages)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        when_free(lambda: use_wal(self._db))
        self._lock = threading.Lock()
        with self._writing() as db:
            for statement in SCHEMA:
                db.execute(statement)
            owned = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'conversations'")
            if not owned.fetchone():
                db.execute(OWNERS)
                db.execute(ADOPT_UNOWNED)

    def _writing(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._db, self._lock)

    def _owner_row(self, conversation_id: str) -> tuple[str | None] | None:
        return self._db.execute(
            "SELECT owner FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()

    def owner_of(self, conversation_id: str) -> str | None:
        """The conversation's owner; None if it does not exist (or predates owners)."""
        with self._lock:
            row = self._owner_row(conversation_id)
        return row[0] if row else None

    def history(self, conversation_id: str, owner: str | None = None) -> list[Message]:
        """The last ``max_messages`` messages, oldest first; [] for a new conversation.

        ``owner=None`` skips the ownership check (in-process callers, admins); another owner's
        conversation raises ``ConversationNotFound``.
        """
        with self._lock:
            row = self._owner_row(conversation_id)
            if row is not None and owner is not None and row[0] != owner:
                raise ConversationNotFound(conversation_id)
            rows = self._db.execute(
                "SELECT role, content FROM messages WHERE conversation_id = ? "
                "ORDER BY id DESC LIMIT ?",
                (conversation_id, self.max_messages),
            ).fetchall()
        return [{"role": role, "content": content} for role, content in reversed(rows)]

    def append(
        self, conversation_id: str, messages: list[Message], owner: str | None = None
    ) -> None:
        """Add messages; the first append makes ``owner`` the owner of the conversation.

        Another owner's conversation raises ``ConversationNotFound`` and stores nothing.
        Messages beyond the newest ``keep_messages`` of the conversation are deleted.
        """
        now = time.time()
        with self._writing() as db:
            db.execute(
                "INSERT OR IGNORE INTO conversations (id, owner, created) VALUES (?, ?, ?)",
                (conversation_id, owner, now),
            )
            row = self._owner_row(conversation_id)
            if owner is not None and row is not None and row[0] != owner:
                raise ConversationNotFound(conversation_id)
            db.executemany(
                "INSERT INTO messages (conversation_id, role, content, created) VALUES (?,?,?,?)",
                [(conversation_id, m["role"], m["content"], now) for m in messages],
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
        with self._lock:
            rows = self._db.execute(
                "SELECT c.id, c.created, count(m.id), max(m.created), (SELECT content FROM "
                "messages WHERE conversation_id = c.id AND role = 'user' ORDER BY id LIMIT 1) "
                "FROM conversations c JOIN messages m ON m.conversation_id = c.id "
                "WHERE c.owner IS ? GROUP BY c.id ORDER BY max(m.id) DESC LIMIT ?",
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
        with self._writing() as db:
            row = self._owner_row(conversation_id)
            if row is None or row[0] != owner:
                raise ConversationNotFound(conversation_id)
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


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
