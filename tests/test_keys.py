"""API keys in the database: shown once, stored hashed, listed, revoked; names never reused.
On SQLite and on PostgreSQL."""

from __future__ import annotations

import json

import pytest
from pg_support import database, postgres_server, postgres_url, target  # noqa: F401

from agentkit.services.keys import ApiKeyError, KeyStore
from agentkit.services.storage import Database

# ruff: noqa: F811  (the fixtures imported from pg_support are redefined as arguments)


def test_a_key_is_shown_once_and_stored_only_as_its_hash(database: Database) -> None:
    store = KeyStore(database, cache_s=0)
    assert not store.any_active()
    key = store.add("alice", "user")
    assert key.startswith("ak_") and len(key) > 40
    with database.read() as db:
        stored = db.execute("SELECT name, role, key_hash FROM api_keys").fetchall()
    assert [(n, r) for n, r, _ in stored] == [("alice", "user")]
    assert key not in repr(stored)
    found = store.find(key)
    assert found is not None and (found.name, found.role) == ("alice", "user")
    assert store.find(key + "x") is None and store.find("") is None
    assert store.any_active()
    assert [k.name for k in store.list()] == ["alice"]


def test_revoked_keys_are_refused_and_their_names_never_reused(database: Database) -> None:
    store = KeyStore(database, cache_s=0)
    key = store.add("bob", "admin")
    other = KeyStore(database, cache_s=0)  # another worker
    assert other.find(key) is not None
    store.revoke("bob")
    assert other.find(key) is None and not other.any_active()
    assert store.list() == [] and [k.name for k in store.list(revoked=True)] == ["bob"]
    with pytest.raises(ApiKeyError, match="revoked key already"):
        store.add("bob", "user")
    with pytest.raises(ApiKeyError, match="no key named 'bob'"):
        store.revoke("bob")


@pytest.mark.parametrize(
    ("name", "role", "message"),
    [
        ("a b", "user", "1-64 letters"),
        ("ok", "root", "unknown role"),
        ("env", "user", "AGENTKIT_API_KEYS"),
    ],
)
def test_bad_names_and_roles_are_refused(
    database: Database, name: str, role: str, message: str
) -> None:
    with pytest.raises(ApiKeyError, match=message):
        KeyStore(database).add(name, role, taken=("env",))


def test_a_worker_remembers_a_lookup_for_a_short_while(database: Database) -> None:
    cached, fresh = KeyStore(database, cache_s=3600), KeyStore(database, cache_s=0)
    key = fresh.add("carol", "user")
    assert cached.find(key) is not None
    fresh.revoke("carol")
    assert fresh.find(key) is None
    assert cached.find(key) is not None  # until cache_s has passed (or forget())
    cached.forget()
    assert cached.find(key) is None


def test_the_keys_commands_print_a_key_once_list_and_revoke(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from agentkit.cli import app

    monkeypatch.setenv("AGENTKIT_STATE_DB", str(tmp_path / "state.sqlite"))
    monkeypatch.setenv("AGENTKIT_API_KEYS", "ops:admin:settings-key")
    monkeypatch.delenv("AGENTKIT_DATABASE_URL", raising=False)
    runner = CliRunner()
    added = runner.invoke(app, ["keys", "add", "alice", "--role", "admin", "--json"])
    assert added.exit_code == 0, added.output
    key = json.loads(added.stdout)["key"]
    found = KeyStore(tmp_path / "state.sqlite").find(key)
    assert found is not None and found.role == "admin"
    listed = runner.invoke(app, ["keys", "list"])
    assert listed.stdout.split()[:2] == ["alice", "admin"] and key not in listed.stdout
    taken = runner.invoke(app, ["keys", "add", "ops"])
    assert taken.exit_code == 1 and "AGENTKIT_API_KEYS" in taken.output
    assert runner.invoke(app, ["keys", "revoke", "alice"]).exit_code == 0
    assert runner.invoke(app, ["keys", "list", "--json"]).stdout.strip() == "[]"
    again = runner.invoke(app, ["keys", "revoke", "alice"])
    assert again.exit_code == 1 and "no key named 'alice'" in again.output
