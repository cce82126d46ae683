"""A real PostgreSQL server for the tests, started once per session (Debian's ``postgresql``
package: ``initdb`` and ``pg_ctl`` in a temporary folder, on a loopback port).

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user, in a
folder that user owns. The tests that use it skip, saying why, where it cannot be had.
``new_database(url)`` gives each test a fresh database of its own on that server.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agentkit.services.storage import Database, open_database


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian keeps it off PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be started here; the message says why."""


@contextmanager
def running_postgres() -> Iterator[str]:
    """A PostgreSQL server in a temporary folder on a free loopback port, for the block: the URL
    of its ``postgres`` database. PostgresUnavailable, saying why, where it cannot be had."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        raise PostgresUnavailable(
            "psycopg is not installed: ./scripts/setup.sh dev installs it"
        ) from None
    binaries = postgres_bin()
    if binaries is None:
        raise PostgresUnavailable("PostgreSQL is not installed (apt-get install postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root without runuser: PostgreSQL cannot start")
    folder = Path(tempfile.mkdtemp(prefix="agentkit-pg-"))
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    try:
        initdb = subprocess.run(
            as_server_user(
                [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--no-sync"]
            ),
            capture_output=True,
            text=True,
        )  # fmt: skip
        if initdb.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {initdb.stderr.strip()[-500:]}")
        port = free_port()
        options = (
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=300"
        )
        started = subprocess.run(
            as_server_user(
                [str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                 str(folder / "server.log"), "-w", "-t", "60", "start"]
            ),
            capture_output=True,
            text=True,
        )  # fmt: skip
        if started.returncode != 0:
            log = (folder / "server.log").read_text(errors="replace")[-800:]
            raise PostgresUnavailable(f"PostgreSQL did not start: {started.stderr.strip()} {log}")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                as_server_user([str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                capture_output=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server of this session (its ``postgres`` database)."""
    try:
        with running_postgres() as url:
            yield url
    except PostgresUnavailable as reason:
        pytest.skip(str(reason))


def new_database(server_url: str) -> str:
    """A new, empty database on the server at ``server_url``: its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh database of this test's own on the session's PostgreSQL server."""
    return new_database(postgres_server)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store keeps its records: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "state.sqlite")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def database(target: str) -> Iterator[Database]:
    """``target`` opened (and closed after the test)."""
    db = open_database(target)
    yield db
    db.close()
