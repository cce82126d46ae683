"""API keys kept in the database (``agentkit keys add/list/revoke``), beside those in settings.

A key is shown once, when it is made, and stored only as its SHA-256: the keys are 256 random
bits, so a fast hash is enough (a slow one guards guessable passwords, which these are not), and
a lookup is one indexed read. A key belongs to a name, the owner of everything made with it; a
revoked key's name is never given to a new key, so nobody inherits its records by accident.

Every worker and replica reads the same table. A worker remembers what it found for
``cache_s`` seconds (a revoked key may still pass there for that long; 0: ask every time).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agentkit.errors import AgentkitError
from agentkit.services.storage import Database, Migration, migrate, open_database, statements

ROLES = ("admin", "user")
KEY_PREFIX = "ak_"
CACHE_S = 5.0
MIGRATIONS = [
    Migration(
        1,
        "API keys, stored hashed",
        statements(
            "CREATE TABLE IF NOT EXISTS api_keys (name TEXT PRIMARY KEY, "
            "role TEXT NOT NULL CHECK (role IN ('admin', 'user')), key_hash TEXT NOT NULL UNIQUE, "
            "created {real} NOT NULL, revoked {real})"
        ),
    )
]


class ApiKeyError(AgentkitError):
    """A key cannot be added or revoked as asked."""


@dataclass(frozen=True)
class StoredKey:
    """A key as ``keys list`` shows it: never the key itself."""

    name: str
    role: Literal["admin", "user"]
    created: float
    revoked: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "created": self.created,
                "revoked": self.revoked}  # fmt: skip


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The ``api_keys`` table of a Database (or a SQLite path / PostgreSQL URL of its own)."""

    def __init__(self, target: Database | Path | str, *, cache_s: float = CACHE_S) -> None:
        self.database = open_database(target)
        self._owns_database = self.database is not target
        self.cache_s = cache_s
        self._found: dict[str, tuple[float, StoredKey | None]] = {}
        self._any: tuple[float, bool] | None = None
        self._lock = threading.Lock()
        migrate(self.database, "keys", MIGRATIONS)

    def add(self, name: str, role: str, *, taken: tuple[str, ...] = ()) -> str:
        """A new key for ``name`` with ``role``: returned once, stored hashed. ``taken``: names
        used elsewhere (the settings' keys), refused as well."""
        from agentkit.services.auth import KEY_NAME

        if not KEY_NAME.fullmatch(name):
            raise ApiKeyError("a key's name is 1-64 letters, digits, '_', '.' or '-'")
        if role not in ROLES:
            raise ApiKeyError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        if name in taken:
            raise ApiKeyError(
                f"{name!r} names a key in AGENTKIT_API_KEYS already; pick another name"
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.database.transaction() as db:
            found = db.execute("SELECT revoked FROM api_keys WHERE name = ?", (name,)).fetchone()
            if found is not None:
                state = "a revoked key" if found[0] is not None else "a key"
                raise ApiKeyError(
                    f"{name!r} is the name of {state} already (names own records and are never "
                    "reused); pick another name"
                )
            db.execute(
                "INSERT INTO api_keys (name, role, key_hash, created) VALUES (?, ?, ?, ?)",
                (name, role, key_hash(key), time.time()),
            )
        self.forget()
        return key

    def list(self, *, revoked: bool = False) -> list[StoredKey]:
        """The keys (the revoked ones too with ``revoked``), oldest first."""
        where = "" if revoked else " WHERE revoked IS NULL"
        with self.database.read() as db:
            rows = db.execute(
                f"SELECT name, role, created, revoked FROM api_keys{where} ORDER BY created, name"
            ).fetchall()
        return [StoredKey(*row) for row in rows]

    def revoke(self, name: str) -> None:
        """Revoke ``name``'s key; its records stay, owned by the name."""
        with self.database.transaction() as db:
            changed = db.execute(
                "UPDATE api_keys SET revoked = ? WHERE name = ? AND revoked IS NULL",
                (time.time(), name),
            ).rowcount
        if not changed:
            raise ApiKeyError(f"no key named {name!r} to revoke; `agentkit keys list` shows them")
        self.forget()

    def find(self, key: str) -> StoredKey | None:
        """The active key ``key`` is, if any (remembered for ``cache_s``)."""
        digest, now = key_hash(key), time.monotonic()
        with self._lock:
            cached = self._found.get(digest)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        with self.database.read() as db:
            row = db.execute(
                "SELECT name, role, created, revoked FROM api_keys "
                "WHERE key_hash = ? AND revoked IS NULL",
                (digest,),
            ).fetchone()
        found = StoredKey(*row) if row else None
        with self._lock:
            if len(self._found) > 10_000:  # bounded: random keys must not fill memory
                self._found.clear()
            self._found[digest] = (now, found)
        return found

    def any_active(self) -> bool:
        """Whether any key is active (remembered for ``cache_s``)."""
        now = time.monotonic()
        if self._any is not None and now - self._any[0] < self.cache_s:
            return self._any[1]
        with self.database.read() as db:
            found = db.execute("SELECT 1 FROM api_keys WHERE revoked IS NULL LIMIT 1").fetchone()
        self._any = (now, found is not None)
        return self._any[1]

    def forget(self) -> None:
        """Drop what this process remembers (after a change made here)."""
        with self._lock:
            self._found.clear()
            self._any = None

    def close(self) -> None:
        if self._owns_database:
            self.database.close()
