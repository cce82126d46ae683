"""The index on disk: SQLite (documents, chunks, vectors, FTS5) + FAISS + manifest.json.

SQLite is the source of truth and the commit point: one transaction per indexing run, so a
crash or kill at any point leaves the previous index intact. ``vectors.faiss`` is written after
the commit (to a temporary file, then renamed) and ``manifest.json`` records the generation it
belongs to; when the two disagree after a crash, the FAISS index is rebuilt from the vectors
kept in SQLite. Nothing is pickled: FAISS's own binary format, JSON and SQLite only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from agentkit.errors import IndexFormatError, IndexLockedError, IndexNotFoundError

FORMAT_VERSION = 1
SQLITE_FILE, FAISS_FILE, MANIFEST_FILE = "index.sqlite", "vectors.faiss", "manifest.json"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY, root TEXT NOT NULL, source TEXT NOT NULL, title TEXT NOT NULL,
    format TEXT NOT NULL, content_hash TEXT NOT NULL, has_lines INTEGER NOT NULL,
    n_chunks INTEGER NOT NULL, indexed_at REAL NOT NULL, UNIQUE (root, source));
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, document_id INTEGER NOT NULL REFERENCES documents(id),
    ordinal INTEGER NOT NULL, heading TEXT NOT NULL, text TEXT NOT NULL,
    char_start INTEGER NOT NULL, char_end INTEGER NOT NULL, line_start INTEGER,
    line_end INTEGER, page INTEGER, n_tokens INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id);
CREATE TABLE IF NOT EXISTS vectors (chunk_id INTEGER PRIMARY KEY, embedding BLOB NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    title, heading, body, tokenize = 'porter unicode61 remove_diacritics 2');
"""

# Query words tokenised by FTS5 itself (so stemmed as the index is), and the index's vocabulary.
VOCAB_TABLES = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_words USING fts5(word,"
    " tokenize = 'porter unicode61 remove_diacritics 2')",
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_tokens"
    " USING fts5vocab(temp, query_words, 'instance')",
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.index_vocab USING fts5vocab(main, chunks_fts, 'row')",
)


def chunk_id_for(root: str, source: str, content_hash: str, ordinal: int) -> int:
    """A stable 63-bit id (FAISS ids and SQLite rowids are signed 64-bit)."""
    digest = hashlib.blake2b(f"{root}\0{source}\0{content_hash}\0{ordinal}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") & 0x7FFF_FFFF_FFFF_FFFF


def new_vector_index(dim: int) -> faiss.Index:
    """Exact inner-product search over float16 codes: half the memory and scan time of float32,
    the same top 50 on our benchmarks (cosines agree to ~1e-3). SQLite keeps the float32 vectors.
    """
    quantizer = faiss.IndexScalarQuantizer(
        dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    return faiss.IndexIDMap2(quantizer)


@contextmanager
def writer_lock(index_path: Path) -> Iterator[None]:
    """Hold the single-writer lock of ``index_path`` (a file beside it, so it survives swaps)."""
    lock_path = index_path.parent / f".{index_path.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise IndexLockedError(
                f"another process (pid {holder}) is writing to the index {index_path}; "
                "wait for it to finish, or use another --index"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the index at ``path``; our errors when it is missing or of another format."""
    if not (path / SQLITE_FILE).exists():
        raise IndexNotFoundError(
            f"no index at {path}: create one with `agentkit index DIR --index {path}`"
        )
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as error:
        raise IndexFormatError(
            f"the index at {path} has no readable {MANIFEST_FILE} ({error}); rebuild it with "
            f"`agentkit index DIR --index {path} --full`"
        ) from error
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"the index at {path} has format version {version}, this agentkit reads version "
            f"{FORMAT_VERSION}; rebuild it with `agentkit index DIR --index {path} --full`"
        )
    return manifest


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class IndexStore:
    """SQLite connection and in-memory FAISS index of one index folder."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.db = sqlite3.connect(path / SQLITE_FILE, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self._vocab_ready, self._vocab_lock = False, threading.Lock()
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.inode = os.stat(path / SQLITE_FILE).st_ino
        self.loaded_generation = -1  # the committed generation self.vectors holds
        self.vectors = self._load_vectors()

    @classmethod
    def create(cls, path: Path, manifest: dict[str, Any]) -> IndexStore:
        path.mkdir(parents=True, exist_ok=True)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "generation": 0}
        manifest.setdefault("created_at", time.time())
        write_atomically(path / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        store = cls(path, manifest)
        store.db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', '0')")
        return store

    @classmethod
    def open(cls, path: Path) -> IndexStore:
        return cls(path, read_manifest(path))

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding"]["dim"])

    @property
    def generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def refresh(self) -> None:
        """Reload FAISS when another process (or Index) committed since it was loaded."""
        if self.generation == self.loaded_generation or self.db.in_transaction:
            return
        try:
            self.manifest = read_manifest(self.path)  # the FAISS file's generation is in it
        except (IndexFormatError, IndexNotFoundError):
            pass  # mid-swap or gone: rebuild from SQLite below
        self.vectors = self._load_vectors()

    def _load_vectors(self) -> faiss.Index:
        """FAISS from disk when it belongs to the committed generation, else rebuilt from SQLite."""
        self.loaded_generation = self.generation  # read first: a later commit reloads again
        count = self.db.execute("SELECT count(*) FROM vectors").fetchone()[0]
        faiss_path = self.path / FAISS_FILE
        if self.manifest.get("generation") == self.generation and faiss_path.exists():
            index = faiss.read_index(str(faiss_path))
            if index.ntotal == count and index.d == self.dim:
                return index
        index = new_vector_index(self.dim)
        rows = self.db.execute("SELECT chunk_id, embedding FROM vectors")
        while batch := rows.fetchmany(4096):
            ids = np.fromiter((r[0] for r in batch), dtype=np.int64, count=len(batch))
            matrix = np.frombuffer(b"".join(r[1] for r in batch), dtype=np.float32)
            index.add_with_ids(matrix.reshape(len(batch), self.dim), ids)
        return index

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All changes inside become visible together, at the end, or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            generation = self.generation + 1
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (generation,))
            self.db.execute("COMMIT")
            self.loaded_generation = generation  # self.vectors already holds these changes
        except BaseException:
            self.db.execute("ROLLBACK")
            self.vectors = self._load_vectors()  # drop the uncommitted in-memory changes
            raise
        self._persist_vectors(generation)

    def _persist_vectors(self, generation: int) -> None:
        faiss_tmp = self.path / f".{FAISS_FILE}.tmp-{os.getpid()}"
        faiss.write_index(self.vectors, str(faiss_tmp))
        with open(faiss_tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(faiss_tmp, self.path / FAISS_FILE)
        self.manifest = {**self.manifest, "generation": generation, "updated_at": time.time()}
        write_atomically(self.path / MANIFEST_FILE, json.dumps(self.manifest, indent=2).encode())

    # ---- documents -------------------------------------------------------------------------

    def document_hashes(self, root: str) -> dict[str, tuple[int, str]]:
        rows = self.db.execute(
            "SELECT source, id, content_hash FROM documents WHERE root = ?", (root,)
        )
        return {source: (doc_id, content_hash) for source, doc_id, content_hash in rows}

    def remove_documents(self, document_ids: Iterable[int]) -> int:
        """Remove documents with their chunks, FTS rows and vectors; returns chunks removed."""
        removed: list[int] = []
        for doc_id in document_ids:
            ids = [
                r[0]
                for r in self.db.execute("SELECT id FROM chunks WHERE document_id = ?", (doc_id,))
            ]
            self.db.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
            self.db.executemany("DELETE FROM vectors WHERE chunk_id = ?", [(i,) for i in ids])
            self.db.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
            self.db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
            removed.extend(ids)
        if removed:
            self.vectors.remove_ids(np.array(removed, dtype=np.int64))
        return len(removed)

    def add_document(
        self, document: dict[str, Any], chunks: list[dict[str, Any]], vectors: np.ndarray
    ) -> None:
        """Insert one document, its chunks (with ``id``) and their vectors (same order)."""
        cursor = self.db.execute(
            "INSERT INTO documents (root, source, title, format, content_hash, has_lines, n_chunks,"
            " indexed_at) VALUES (:root, :source, :title, :format, :content_hash, :has_lines,"
            " :n_chunks, :indexed_at)",
            {**document, "n_chunks": len(chunks), "indexed_at": time.time()},
        )
        doc_id = cursor.lastrowid
        self.db.executemany(
            "INSERT INTO chunks VALUES (:id, :document_id, :ordinal, :heading, :text, :char_start,"
            " :char_end, :line_start, :line_end, :page, :n_tokens)",
            [{**c, "document_id": doc_id} for c in chunks],
        )
        self.db.executemany(
            "INSERT INTO chunks_fts (rowid, title, heading, body) VALUES (?, ?, ?, ?)",
            [(c["id"], document["title"], c["heading"], c["text"]) for c in chunks],
        )
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.db.executemany(
            "INSERT INTO vectors VALUES (?, ?)",
            [(c["id"], vectors[i].tobytes()) for i, c in enumerate(chunks)],
        )
        if chunks:
            ids = np.array([c["id"] for c in chunks], dtype=np.int64)
            self.vectors.add_with_ids(vectors, ids)

    def vectors_of(self, chunk_ids: list[int]) -> dict[int, np.ndarray]:
        """The stored float32 vectors of ``chunk_ids`` (ids without one are left out)."""
        if not chunk_ids:
            return {}
        marks = ",".join("?" * len(chunk_ids))
        rows = self.db.execute(
            f"SELECT chunk_id, embedding FROM vectors WHERE chunk_id IN ({marks})", chunk_ids
        )
        return {cid: np.frombuffer(blob, dtype=np.float32) for cid, blob in rows}

    def document_frequencies(self, words: list[str]) -> list[int]:
        """For each word, how many chunks hold it, as FTS5 tokenises it (stemmed); a word the
        tokenizer splits (``docs_src``) counts its rarest piece, an upper bound of its matches.
        """
        with self._vocab_lock:  # one scratch table per connection
            if not self._vocab_ready:  # (not executescript: it would COMMIT an open transaction)
                for statement in VOCAB_TABLES:
                    self.db.execute(statement)
                self._vocab_ready = True
            self.db.executemany(
                "INSERT INTO temp.query_words (rowid, word) VALUES (?, ?)", enumerate(words)
            )
            try:
                tokens = self.db.execute("SELECT doc, term FROM temp.query_tokens").fetchall()
            finally:
                self.db.execute("DELETE FROM temp.query_words")
        frequency: dict[str, int] = {}
        for term in {t for _, t in tokens}:
            row = self.db.execute("SELECT doc FROM temp.index_vocab WHERE term = ?", (term,))
            frequency[term] = (row.fetchone() or (0,))[0]
        per_word: dict[int, int] = {}
        for word, term in tokens:
            per_word[word] = min(per_word.get(word, frequency[term]), frequency[term])
        return [per_word.get(i, 0) for i in range(len(words))]

    def counts(self) -> tuple[int, int]:
        documents = self.db.execute("SELECT count(*) FROM documents").fetchone()[0]
        chunks = self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return documents, chunks

    def close(self) -> None:
        self.db.close()
