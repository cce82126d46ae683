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
import shutil
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from agentkit.errors import (
    IndexCorruptError,
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
)

FORMAT_VERSION = 1
SQLITE_FILE, FAISS_FILE, MANIFEST_FILE = "index.sqlite", "vectors.faiss", "manifest.json"
TABLES = ("meta", "documents", "chunks", "vectors", "chunks_fts")
SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26

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


def damaged(path: Path, detail: str) -> IndexCorruptError:
    return IndexCorruptError(
        f"the index at {path} is damaged ({detail}); rebuild it with "
        f"`agentkit index DIR --index {path} --full`"
    )


def is_corruption(error: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the file is damaged (not busy, locked, or a bad statement)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)
    return any(text in str(error) for text in ("malformed", "not a database", "corrupt"))


@contextmanager
def damage_reported(path: Path) -> Iterator[None]:
    """SQLite errors that mean a damaged index become an IndexCorruptError naming the repair."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        if not is_corruption(error):
            raise
        raise damaged(path, f"{SQLITE_FILE}: {error}") from error


def check_sqlite_file(path: Path) -> None:
    """IndexCorruptError when ``index.sqlite`` is empty, not SQLite, or shorter than its header
    says (truncated). Reads 100 bytes: cheap enough for every open."""
    wal = path / f"{SQLITE_FILE}-wal"
    wal_pending = wal.exists() and wal.stat().st_size > 0  # then SQLite has the last word
    with open(path / SQLITE_FILE, "rb") as handle:
        header = handle.read(100)
        size = os.fstat(handle.fileno()).st_size
    if size == 0 and not wal_pending:
        raise damaged(path, f"{SQLITE_FILE} is empty")
    if size and (len(header) < 100 or not header.startswith(SQLITE_MAGIC)):
        raise damaged(path, f"{SQLITE_FILE} is not an SQLite database")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    expected = int.from_bytes(header[28:32], "big") * page_size
    header_size_valid = header[24:28] == header[92:96]  # SQLite's own rule for that field
    if header_size_valid and not wal_pending and size < expected:
        raise damaged(path, f"{SQLITE_FILE} is truncated: {size:,} of {expected:,} bytes")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_files(index_path: Path) -> None:
    """Delete what killed writers left: ``.<index>.build-<pid>`` folders beside the index (made
    only under the writer lock, so with the lock held their writers are gone) and temporary files
    of dead processes inside it."""
    prefix = f".{index_path.name}.build-"
    try:
        beside = list(index_path.parent.iterdir())
    except OSError:
        return
    for path in beside:
        if path.name.startswith(prefix) and path.name[len(prefix) :].isdigit():
            shutil.rmtree(path, ignore_errors=True)
    for tmp in index_path.glob(".*.tmp-*") if index_path.is_dir() else []:
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


@contextmanager
def writer_lock(index_path: Path) -> Iterator[None]:
    """Hold the single-writer lock of ``index_path`` (a file beside it, so it survives swaps).

    Taking it removes what killed writers left behind (``remove_stale_files``).
    """
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
            remove_stale_files(index_path)
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


def _close_for(store: weakref.ref[IndexStore], db: sqlite3.Connection) -> None:
    """A thread that used ``db`` has ended: close it (and forget it, if its store is open)."""
    owner = store()
    if owner is not None:
        owner._forget(db)
    else:
        db.close()


class IndexStore:
    """SQLite connection and in-memory FAISS index of one index folder."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, new: bool = False) -> None:
        """Open the SQLite file of ``path`` (``new``: create its tables). An existing one is
        checked first: IndexCorruptError when it is damaged."""
        self.path = path
        self.manifest = manifest
        # one connection per thread: WAL readers run in parallel (a shared connection would
        # serialise them on its mutex); a writer stays on its thread's connection
        self._local = threading.local()
        self._connections: set[sqlite3.Connection] = set()
        self._connections_lock = threading.Lock()
        if not new:
            check_sqlite_file(path)
        try:
            with damage_reported(path):
                self.db.execute("PRAGMA journal_mode=WAL")
                if new:
                    self.db.executescript(SCHEMA)
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', '0')")
                else:
                    self._check_tables()
                self.inode = os.stat(path / SQLITE_FILE).st_ino
                self.loaded_generation = -1  # the committed generation self.vectors holds
                self.vectors = self._load_vectors()
        except BaseException:
            self.close()
            raise

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection to ``index.sqlite``."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.path / SQLITE_FILE, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db, self._local.vocab_ready = db, False
            with self._connections_lock:
                self._connections.add(db)
            # a thread per request (the API's chat) must not leave a connection each behind
            weakref.finalize(threading.current_thread(), _close_for, weakref.ref(self), db)
        return db

    def _forget(self, db: sqlite3.Connection) -> None:
        with self._connections_lock:
            self._connections.discard(db)
        db.close()

    def _check_tables(self) -> None:
        """IndexCorruptError when tables or the generation are missing, or the manifest is ahead
        of the database (it is written after each commit, so the database was replaced)."""
        rows = self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        missing = set(TABLES) - {name for (name,) in rows}
        if missing:
            raise damaged(self.path, f"{SQLITE_FILE} has no table {', '.join(sorted(missing))}")
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        if row is None:
            raise damaged(self.path, f"{SQLITE_FILE} records no generation")
        if int(self.manifest.get("generation", 0)) > int(row[0]):
            self.manifest = read_manifest(self.path)  # read before a --full swap, maybe
        if int(self.manifest.get("generation", 0)) > int(row[0]):
            raise damaged(
                self.path,
                f"{MANIFEST_FILE} is at generation {self.manifest['generation']} but "
                f"{SQLITE_FILE} at {row[0]}: the database was replaced or rolled back",
            )

    def check_integrity(self) -> None:
        """``PRAGMA quick_check`` (reads the whole file: done before writing, not on every
        open); IndexCorruptError when it finds damage."""
        with damage_reported(self.path):
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise damaged(self.path, f"{SQLITE_FILE} fails quick_check: {'; '.join(problems)}")

    @classmethod
    def create(cls, path: Path, manifest: dict[str, Any]) -> IndexStore:
        path.mkdir(parents=True, exist_ok=True)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "generation": 0}
        manifest.setdefault("created_at", time.time())
        write_atomically(path / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        return cls(path, manifest, new=True)

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
            try:
                index = faiss.read_index(str(faiss_path))
            except RuntimeError:  # a damaged FAISS file: SQLite holds every vector
                index = None
            if index is not None and index.ntotal == count and index.d == self.dim:
                return index
        index = new_vector_index(self.dim)
        rows = self.db.execute("SELECT chunk_id, embedding FROM vectors")
        while batch := rows.fetchmany(4096):
            ids = np.fromiter((r[0] for r in batch), dtype=np.int64, count=len(batch))
            matrix = np.frombuffer(b"".join(r[1] for r in batch), dtype=np.float32)
            if matrix.size != len(batch) * self.dim:
                raise damaged(self.path, f"stored vectors are not of dimension {self.dim}")
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
    ) -> int:
        """Insert one document, its chunks (with ``id``) and their vectors (same order)."""
        document_id = self.insert_document(document, n_chunks=len(chunks))
        self.add_chunks(document_id, document["title"], chunks, vectors)
        return document_id

    def insert_document(self, document: dict[str, Any], n_chunks: int = 0) -> int:
        """Insert a document's row; its chunks follow with ``add_chunks``."""
        cursor = self.db.execute(
            "INSERT INTO documents (root, source, title, format, content_hash, has_lines, n_chunks,"
            " indexed_at) VALUES (:root, :source, :title, :format, :content_hash, :has_lines,"
            " :n_chunks, :indexed_at)",
            {**document, "n_chunks": n_chunks, "indexed_at": time.time()},
        )
        return int(cursor.lastrowid)

    def set_chunk_count(self, document_id: int, n_chunks: int) -> None:
        self.db.execute("UPDATE documents SET n_chunks = ? WHERE id = ?", (n_chunks, document_id))

    def add_chunks(
        self, document_id: int, title: str, chunks: list[dict[str, Any]], vectors: np.ndarray
    ) -> None:
        """Insert chunks (with ``id``) of a document and their vectors (same order)."""
        self.db.executemany(
            "INSERT INTO chunks VALUES (:id, :document_id, :ordinal, :heading, :text, :char_start,"
            " :char_end, :line_start, :line_end, :page, :n_tokens)",
            [{**c, "document_id": document_id} for c in chunks],
        )
        self.db.executemany(
            "INSERT INTO chunks_fts (rowid, title, heading, body) VALUES (?, ?, ?, ?)",
            [(c["id"], title, c["heading"], c["text"]) for c in chunks],
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
        db = self.db  # scratch tables are per connection, and so per thread
        if not self._local.vocab_ready:  # (not executescript: it would COMMIT an open transaction)
            for statement in VOCAB_TABLES:
                db.execute(statement)
            self._local.vocab_ready = True
        db.executemany("INSERT INTO temp.query_words (rowid, word) VALUES (?, ?)", enumerate(words))
        try:
            tokens = db.execute("SELECT doc, term FROM temp.query_tokens").fetchall()
        finally:
            db.execute("DELETE FROM temp.query_words")
        frequency: dict[str, int] = {}
        for term in {t for _, t in tokens}:
            row = self.db.execute("SELECT doc FROM temp.index_vocab WHERE term = ?", (term,))
            frequency[term] = (row.fetchone() or (0,))[0]
        per_word: dict[int, int] = {}
        for word, term in tokens:
            per_word[word] = min(per_word.get(word, frequency[term]), frequency[term])
        return [per_word.get(i, 0) for i in range(len(words))]

    def document_ids(self, source: str, root: str | None = None) -> list[int]:
        """Ids of the documents with this source path (one per root; or only under ``root``)."""
        if root is None:
            rows = self.db.execute("SELECT id FROM documents WHERE source = ?", (source,))
        else:
            rows = self.db.execute(
                "SELECT id FROM documents WHERE source = ? AND root = ?", (source, root)
            )
        return [r[0] for r in rows]

    def roots_of(self, source: str) -> set[str]:
        """The roots that hold a document with this source path."""
        rows = self.db.execute("SELECT DISTINCT root FROM documents WHERE source = ?", (source,))
        return {r[0] for r in rows}

    def documents(self) -> list[dict[str, Any]]:
        """Every document (source, title, format, chunks, indexed_at, root), newest first."""
        rows = self.db.execute(
            "SELECT source, title, format, n_chunks, indexed_at, root FROM documents "
            "ORDER BY indexed_at DESC, source"
        ).fetchall()
        keys = ("source", "title", "format", "chunks", "indexed_at", "root")
        return [dict(zip(keys, row)) for row in rows]

    def titles(self) -> dict[int, str]:
        """Every document's title by its id."""
        return dict(self.db.execute("SELECT id, title FROM documents").fetchall())

    def document_chunks(self, document_id: int) -> list[tuple[str, int, int]]:
        """(text, char_start, char_end) of a document's chunks, in document order."""
        return self.db.execute(
            "SELECT text, char_start, char_end FROM chunks WHERE document_id = ? "
            "ORDER BY char_start",
            (document_id,),
        ).fetchall()

    def counts(self) -> tuple[int, int]:
        documents = self.db.execute("SELECT count(*) FROM documents").fetchone()[0]
        chunks = self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return documents, chunks

    def close(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for db in connections:
            db.close()
