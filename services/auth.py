"""Who makes a request: API keys (``name:role:key``), the caller they make, and the FastAPI
dependencies that ask for one (a key, an admin key, a key when the docs are protected)."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from fastapi import Depends, Request
from starlette.exceptions import HTTPException

from agentkit.errors import ConfigError

if TYPE_CHECKING:
    from agentkit.services.keys import KeyStore

ROLES = ("admin", "user")


@dataclass(frozen=True)
class ApiKey:
    """One accepted bearer key: its ``name`` is what records are owned by, never the key."""

    name: str
    role: Literal["admin", "user"]
    key: str = field(repr=False)


@dataclass(frozen=True)
class Caller:
    """Who makes a request: the key's name and role (``anonymous`` admin on an open API)."""

    name: str
    role: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def owner(self) -> str | None:
        """What this caller's records are owned by: the key's name; None on an open API (records
        no key owns: once keys are set, only admins reach them)."""
        return None if self is ANONYMOUS else self.name


ANONYMOUS = Caller("anonymous", "admin")  # no keys set: one implicit owner who may do anything
KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_api_keys(entries: Iterable[str | ApiKey]) -> tuple[ApiKey, ...]:
    """``name:role:key`` entries (role ``admin`` or ``user``; the key may itself hold colons),
    or bare keys (no colon), which are admins named ``key1``, ``key2``, … in the order the bare
    keys are listed. Raises ConfigError naming the entry (never the key) when one is malformed.
    """
    keys: list[ApiKey] = []
    bare = 0
    for number, entry in enumerate(entries, 1):
        if isinstance(entry, ApiKey):
            keys.append(entry)
            continue
        entry = entry.strip()
        if ":" not in entry:
            bare += 1
            name, role, key = f"key{bare}", "admin", entry
        else:
            parts = entry.split(":", 2)
            if len(parts) != 3:
                raise ConfigError(
                    f"AGENTKIT_API_KEYS entry {number} is not name:role:key (or a bare key "
                    "without ':'); fix that entry"
                )
            name, role, key = (p.strip() for p in parts)
        if not key:
            raise ConfigError(f"AGENTKIT_API_KEYS entry {number} has an empty key; give it one")
        if not KEY_NAME.fullmatch(name):
            raise ConfigError(
                f"AGENTKIT_API_KEYS entry {number}: the name must be 1-64 letters, digits, '_', "
                "'.' or '-'"
            )
        if role not in ROLES:
            raise ConfigError(
                f"AGENTKIT_API_KEYS entry {number} ({name}): unknown role {role!r}; "
                f"use one of {', '.join(ROLES)}"
            )
        keys.append(ApiKey(name, role, key))  # type: ignore[arg-type]
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"AGENTKIT_API_KEYS names {', '.join(twice)} twice; names must differ")
    if len({k.key for k in keys}) != len(keys):
        raise ConfigError("AGENTKIT_API_KEYS lists the same key twice; give each name its own key")
    return tuple(keys)


class Limiter(Protocol):
    def allow(self, key: str) -> bool: ...


def key_checker(
    keys: tuple[ApiKey, ...],
    limiter: Limiter,
    stored: KeyStore | None = None,
    *,
    in_database: bool = False,
) -> Callable[[Request], Caller | Awaitable[Caller]]:
    """What checks a request's bearer key: its Caller, a 401 without a valid key, a 429 over
    ``limiter``'s rate. Keys are those of settings (``keys``) and, with ``stored``, those kept in
    the database (``agentkit keys add``). With no key anywhere, everyone is ANONYMOUS.

    ``in_database``: the limiter counts in the database too; the check then runs in a thread,
    off the event loop, as does any check that may read the database (not one that matches a
    settings key on an API without a database limiter)."""

    def check(request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        text = header[7:] if header.lower().startswith("bearer ") else ""
        token = text.encode()
        found = None
        for entry in keys:  # every key is compared, so timing tells nothing
            if hmac.compare_digest(token, entry.key.encode()):
                found = Caller(entry.name, entry.role)
        if found is None and stored is not None:
            if not keys and not stored.any_active():
                return ANONYMOUS
            if text:  # looked up by its hash: the lookup's timing tells nothing of the key
                hit = stored.find(text)
                found = Caller(hit.name, hit.role) if hit is not None else None
        elif found is None and not keys:
            return ANONYMOUS
        if found is None:
            raise HTTPException(401, "missing or invalid API key: send Authorization: Bearer KEY")
        if not limiter.allow(found.name):
            raise HTTPException(429, "rate limit reached for this API key; retry in a minute")
        return found

    if stored is None and not in_database:
        return check

    async def authorize(request: Request) -> Caller:
        return await asyncio.to_thread(check, request)

    return authorize


async def current_caller(request: Request) -> Caller:
    """The caller making ``request`` (a FastAPI dependency): 401 without a valid key, 429 over
    the rate limit. Async: a key check is quick, and on the event loop it costs no pool thread."""
    caller = request.app.state.authorize(request)
    return await caller if inspect.isawaitable(caller) else caller


AUTHORIZED = Depends(current_caller)


async def current_admin(caller: Caller = AUTHORIZED) -> Caller:
    """The caller, when it is an admin; else 403."""
    if not caller.admin:
        raise HTTPException(
            403, f"this needs an admin API key; the key {caller.name!r} has the role user"
        )
    return caller


async def docs_reader(request: Request) -> Caller:
    """The caller of /metrics and the API's docs: any key when they are protected, else anyone."""
    return await current_caller(request) if request.app.state.protect_docs else ANONYMOUS


ADMIN = Depends(current_admin)
DOCS_READER = Depends(docs_reader)
