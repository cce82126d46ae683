"""Indexing survives hostile folders and damaged indexes: it skips and reports, or says how to
repair; it never hangs, reads outside the folder, holds a whole large document, or serves a
broken index as an empty one."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from fakes import HashingEmbedder
from typer.testing import CliRunner

from agentkit import Index, index_folder
from agentkit.cli import app
from agentkit.errors import IndexCorruptError
from agentkit.retrievers import indexer
from agentkit.settings import Settings


def build(docs: Path, settings: Settings, embedder: HashingEmbedder, **kw):
    return index_folder(docs, settings.index, settings=settings, embedder=embedder, **kw)


def sources(settings: Settings, embedder: HashingEmbedder) -> set[str]:
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        return {r[0] for r in index.store.db.execute("SELECT source FROM documents")}


# ---- what the folder holds -----------------------------------------------------------------


def test_named_pipes_and_sockets_are_skipped_without_being_opened(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    os.mkfifo(docs / "p.md")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(docs / "s.md"))
    outcome: dict[str, object] = {}
    worker = threading.Thread(
        target=lambda: outcome.update(summary=build(docs, settings, embedder)), daemon=True
    )
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # the old indexer blocks reading the pipe: release it, then fail
        os.close(os.open(docs / "p.md", os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=10)
        pytest.fail("indexing hung on a named pipe")
    server.close()
    summary = outcome["summary"]
    assert (summary.added, summary.skipped) == (3, 3)  # image.png, p.md, s.md
    assert "skipped p.md: a named pipe, not a regular file" in summary.warnings
    assert "skipped s.md: a socket, not a regular file" in summary.warnings
    assert sources(settings, embedder) == {"guide/install.md", "notes.txt", "page.html"}


def test_files_over_the_size_limit_are_skipped_and_named(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    (docs / "notes.txt").write_text("The walrus release. " * 100)  # 2,000 bytes
    small = settings.model_copy(update={"max_file_bytes": 1000})
    summary = build(docs, small, embedder)
    assert summary.skipped == 2 and summary.removed == 1  # its old version leaves the index too
    assert (
        "skipped notes.txt: over AGENTKIT_MAX_FILE_BYTES (1,000 bytes); raise that setting to "
        "index it" in summary.warnings
    )
    assert sources(settings, embedder) == {"guide/install.md", "page.html"}


def test_symlinks_never_lead_out_of_the_folder(
    docs: Path, settings: Settings, embedder: HashingEmbedder, tmp_path: Path
) -> None:
    outside = tmp_path / "private"
    (outside / "keys").mkdir(parents=True)
    (outside / "secret.md").write_text("# Secret\n\nThe vault code is okapi.\n")
    (outside / "keys" / "key.md").write_text("# Key\n\nThe key is marmoset.\n")
    os.symlink(outside / "secret.md", docs / "secret.md")
    os.symlink(outside / "keys", docs / "keys")
    os.symlink(docs / "notes.txt", docs / "guide" / "alias.txt")  # inside: still indexed
    (docs / ".drafts").mkdir()  # hidden: only reached through the link below
    (docs / ".drafts" / "draft.md").write_text("# Draft\n\nA draft about lemurs.\n")
    os.symlink(docs / ".drafts", docs / "drafts")  # a folder inside: still walked

    summary = build(docs, settings, embedder)
    real = Path(os.path.realpath(outside))
    assert f"skipped keys: a symlink to {real / 'keys'}, outside the folder being indexed" in (
        summary.warnings
    )
    assert (
        f"skipped secret.md: a symlink to {real / 'secret.md'}, outside the folder being "
        "indexed" in summary.warnings
    )
    assert summary.skipped == 3  # image.png, keys, secret.md
    assert sources(settings, embedder) == {
        "guide/install.md",
        "guide/alias.txt",
        "drafts/draft.md",
        "notes.txt",
        "page.html",
    }
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        found = index.search("vault code okapi key marmoset", k=20, mode="bm25")
    assert not [hit for hit in found if "okapi" in hit.text or "marmoset" in hit.text]


def test_a_file_swapped_for_a_link_out_of_the_folder_leaves_the_index(
    docs: Path, settings: Settings, embedder: HashingEmbedder, tmp_path: Path
) -> None:
    build(docs, settings, embedder)
    (tmp_path / "elsewhere.txt").write_text("Private walrus notes.\n")
    (docs / "notes.txt").unlink()
    os.symlink(tmp_path / "elsewhere.txt", docs / "notes.txt")
    summary = build(docs, settings, embedder)
    assert summary.removed == 1
    assert "notes.txt" not in sources(settings, embedder)


# ---- large documents -----------------------------------------------------------------------


class RecordingEmbedder(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.batches.append(len(texts))
        return super().embed(texts)


def test_a_large_document_is_embedded_and_written_in_bounded_batches(
    docs: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(indexer, "EMBED_BATCH_CHUNKS", 16)
    words = " ".join(f"w{i % 97} aardvark{i}." for i in range(3000))  # one line, ~150 chunks
    (docs / "huge.md").write_text(words)
    embedder = RecordingEmbedder()
    summary = build(docs, settings, embedder)
    assert summary.added == 4
    assert embedder.batches and max(embedder.batches) <= 16
    assert sum(embedder.batches) == summary.chunks_embedded == summary.chunks_total > 100
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        db = index.store.db
        n_chunks, doc_id = db.execute(
            "SELECT n_chunks, id FROM documents WHERE source = 'huge.md'"
        ).fetchone()
        rows = db.execute(
            "SELECT ordinal, char_start, char_end, text FROM chunks WHERE document_id = ?"
            " ORDER BY ordinal",
            (doc_id,),
        ).fetchall()
        assert [r[0] for r in rows] == list(range(n_chunks)) and n_chunks > 100
        assert all(words[start:end] == text for _, start, end, text in rows)
        assert index.store.vectors.ntotal == index.store.counts()[1]
        assert index.search("aardvark2999", k=1, mode="bm25")[0].source == "huge.md"


# ---- damaged indexes -----------------------------------------------------------------------


def empty(index: Path) -> None:
    (index / "index.sqlite").write_bytes(b"")


def truncated(index: Path) -> None:
    data = (index / "index.sqlite").read_bytes()
    (index / "index.sqlite").write_bytes(data[: len(data) // 2])


def not_sqlite(index: Path) -> None:
    (index / "index.sqlite").write_bytes(b"this is not a database" * 500)


def table_dropped(index: Path) -> None:
    with sqlite3.connect(index / "index.sqlite") as db:
        db.execute("DROP TABLE vectors")


def replaced_by_an_older_database(index: Path) -> None:
    manifest = json.loads((index / "manifest.json").read_text())
    (index / "manifest.json").write_text(json.dumps({**manifest, "generation": 99}))


DAMAGE = {
    "empty": (empty, "index.sqlite is empty"),
    "truncated": (truncated, "index.sqlite is truncated"),
    "not-sqlite": (not_sqlite, "index.sqlite is not an SQLite database"),
    "table-dropped": (table_dropped, "index.sqlite has no table vectors"),
    "older-database": (replaced_by_an_older_database, "manifest.json is at generation 99"),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_index_is_an_error_naming_the_repair_and_full_repairs_it(
    docs: Path, settings: Settings, embedder: HashingEmbedder, damage
) -> None:
    make_damage, detail = damage
    build(docs, settings, embedder)
    make_damage(settings.index)
    repair = f"rebuild it with `agentkit index DIR --index {settings.index} --full`"
    with pytest.raises(IndexCorruptError) as error:
        Index.open(settings.index, settings=settings, embedder=embedder)
    assert str(error.value).startswith(f"the index at {settings.index} is damaged ({detail}")
    assert str(error.value).endswith(repair) and "\n" not in str(error.value)
    with pytest.raises(IndexCorruptError, match="--full"):
        build(docs, settings, embedder)  # an incremental run does not build on it

    summary = build(docs, settings, embedder, full=True)
    assert summary.added == 3
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        assert index.search("walrus release", k=1)[0].source == "notes.txt"


def test_the_cli_reports_a_damaged_index_in_one_line(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    truncated(settings.index)
    for command in (["search", "walrus"], ["stats"], ["index", str(docs)]):
        result = CliRunner().invoke(app, [*command, "--index", str(settings.index)])
        assert result.exit_code == 1, result.output
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "is damaged" in result.stderr and "--full" in result.stderr


def test_damage_inside_the_file_is_found_before_a_write(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    for i in range(40):  # enough pages that the damage below misses the schema
        (docs / f"extra{i}.md").write_text(f"# Extra {i}\n\n" + f"The tapir number {i}. " * 200)
    build(docs, settings, embedder)
    path = settings.index / "index.sqlite"
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    for start in range(4 * page, len(data) - page, 3 * page):  # scribble over every third page
        data[start + 8 : start + page] = os.urandom(page - 8)
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="is damaged .*--full"):
        build(docs, settings, embedder)
    build(docs, settings, embedder, full=True)
    assert len(sources(settings, embedder)) == 43


def test_a_damaged_faiss_file_is_rebuilt_from_sqlite(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    faiss_file = settings.index / "vectors.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        assert index.store.vectors.ntotal == index.store.counts()[1] > 0
        assert index.search("walrus", k=1, mode="dense")[0].source == "notes.txt"


# ---- what killed runs leave ----------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("full", [False, True], ids=["incremental", "full"])
def test_build_folders_of_killed_runs_are_removed_by_the_next_run(
    docs: Path, settings: Settings, embedder: HashingEmbedder, full: bool
) -> None:
    build(docs, settings, embedder)
    pid = dead_pid()
    stale = settings.index.with_name(f".{settings.index.name}.build-{pid}")
    (stale / "sub").mkdir(parents=True)
    (stale / "index.sqlite").write_bytes(b"half a build")
    stale_tmp = settings.index / f".vectors.faiss.tmp-{pid}"
    stale_tmp.write_bytes(b"half a write")
    other_index = settings.index.with_name(f".{settings.index.name}.build-x.build-{pid}")
    other_index.mkdir()  # the build folder of an index named "index.build-x": not ours
    build(docs, settings, embedder, full=full)
    assert not stale.exists() and not stale_tmp.exists()
    assert other_index.exists()
