"""The index as an SDK object: ``Index.open(path).search(query, k=5)``."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agentkit import tracing
from agentkit.errors import AgentkitError, EmbeddingModelError
from agentkit.settings import Settings, get_settings

from . import indexer
from .embedding import Embedder
from .indexer import ChunkingParams, ProgressFn
from .search import SearchMode, search
from .store import SQLITE_FILE, IndexStore, damage_reported, writer_lock
from .types import Hit, LoadedDocument, SyncSummary

log = logging.getLogger(__name__)


class Index:
    """An open index folder: search it, or bring it up to date with documents.

    Methods that write take the index's single-writer lock; another writer gets
    ``IndexLockedError``. The embedding model and chunking of an index are those recorded in its
    manifest; asking for another model is an ``EmbeddingModelError``. A damaged index is an
    ``IndexCorruptError`` (on open, before a write, or when a search meets the damage).
    """

    def __init__(
        self, store: IndexStore, settings: Settings, embedder: Embedder | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        embedding = store.manifest["embedding"]
        self.embedder = embedder or Embedder.from_settings(
            settings, model=embedding["model"], backend=embedding["backend"]
        )
        chunking = store.manifest["chunking"]
        self.chunking = ChunkingParams(chunking["max_tokens"], chunking["overlap_tokens"])
        self._follow_lock = threading.Lock()
        # searches share the index; a write in this process has it alone (FAISS is changed in
        # place). Other processes are kept apart by the writer lock file and SQLite's WAL.
        self.lock = ReadWriteLock()

    @property
    def path(self) -> Path:
        return self.store.path

    @classmethod
    def open(
        cls,
        path: str | Path | None = None,
        *,
        settings: Settings | None = None,
        embedder: Embedder | None = None,
    ) -> Index:
        """Open an existing index (default: ``AGENTKIT_INDEX``, else ``./.agentkit/index``).

        ``embedder`` replaces the model named in the manifest (tests, custom models); its
        ``name`` must still match the manifest's.
        """
        settings = settings or get_settings()
        path = Path(path or settings.index).expanduser()
        store = IndexStore.open(path)
        check_embedding_model(store.manifest, settings, path, embedder)
        return cls(store, settings, embedder)

    @classmethod
    def create(
        cls, path: str | Path, *, settings: Settings | None = None, embedder: Embedder | None = None
    ) -> Index:
        """A new, empty index at ``path`` with the configured embedding model and chunking."""
        settings = settings or get_settings()
        path = Path(path).expanduser()
        embedder = embedder or Embedder.from_settings(settings)
        max_tokens = min(settings.chunk_tokens or embedder.max_tokens, embedder.max_tokens)
        manifest = {
            "embedding": {
                "model": embedder.name,
                "backend": embedder.backend,
                "dim": embedder.dim,
                "max_tokens": embedder.max_tokens,
            },
            "chunking": {
                "max_tokens": max_tokens,
                "overlap_tokens": settings.chunk_overlap_tokens,
                "markdown": "split at headings, heading path kept",
                "splitter": "langchain RecursiveCharacterTextSplitter, token-sized",
                "prefix": "title > heading, embedded before each chunk",
                "embedded_markdown": "without link targets, image sources, heading attributes "
                "and inline HTML tags (stored and keyword-indexed as written)",
            },
        }
        return cls(IndexStore.create(path, manifest), settings, embedder)

    @classmethod
    def open_or_create(
        cls,
        path: str | Path | None = None,
        *,
        settings: Settings | None = None,
        embedder: Embedder | None = None,
    ) -> Index:
        settings = settings or get_settings()
        path = Path(path or settings.index).expanduser()
        if (path / SQLITE_FILE).exists():
            return cls.open(path, settings=settings, embedder=embedder)
        return cls.create(path, settings=settings, embedder=embedder)

    def follow_disk(self) -> IndexStore:
        """The store, brought up to date with what other writers committed: FAISS is reloaded
        after a new generation, and the whole store reopened after a ``--full`` rebuild swapped
        the folder. Costs a stat and one SQLite read when nothing changed."""
        with self._follow_lock:
            try:
                inode = os.stat(self.path / SQLITE_FILE).st_ino
            except OSError:
                return self.store  # mid-swap or removed: keep serving what is open
            if inode == self.store.inode:
                self.store.refresh()
                return self.store
            try:
                fresh = IndexStore.open(self.path)
            except AgentkitError as error:
                log.warning(
                    "%s changed but cannot be reopened (%s); serving the old one", self.path, error
                )
                return self.store
            built_with = fresh.manifest["embedding"]["model"]
            if built_with != self.embedder.name:
                log.warning(
                    "%s was rebuilt with the embedding model %s; reopen it to search it",
                    self.path,
                    built_with,
                )
                fresh.close()
                return self.store
            # The old store is not closed: a search in another thread may still be using it.
            self.store = fresh
            return fresh

    def search(self, query: str, *, k: int = 5, mode: SearchMode = "hybrid") -> list[Hit]:
        """The ``k`` best chunks for ``query`` (hybrid: dense + BM25, fused by reciprocal rank)."""
        attributes = {"agentkit.retrieval.query": query, "agentkit.retrieval.k": k,
                      "agentkit.retrieval.mode": mode}  # fmt: skip
        with (
            tracing.span("retrieval", attributes) as traced,
            self.lock.reading(),
            damage_reported(self.path),
        ):
            hits = search(
                self.follow_disk(),
                self.embedder,
                query,
                k=k,
                mode=mode,
                max_query_chars=self.settings.max_query_chars,
            )
            traced.set("agentkit.retrieval.hits", len(hits))
            return hits

    def _writable_store(self) -> IndexStore:
        """The store as others left it, checked before this writer changes it."""
        store = self.follow_disk()  # start from what others committed before the lock
        store.check_integrity()
        return store

    def sync_folder(self, folder: str | Path, *, progress: ProgressFn | None = None) -> SyncSummary:
        """Make the index match ``folder``: add new files, replace changed, remove deleted."""
        with self.lock.writing(), writer_lock(self.path), damage_reported(self.path):
            return indexer.sync_folder(
                self._writable_store(),
                self.embedder,
                Path(folder),
                self.chunking,
                progress,
                max_file_bytes=self.settings.max_file_bytes,
            )

    def add_documents(self, docs: Iterable[LoadedDocument]) -> SyncSummary:
        """Add or replace in-memory documents (matched by root and source)."""
        with self.lock.writing(), writer_lock(self.path), damage_reported(self.path):
            return indexer.add_documents(self._writable_store(), self.embedder, docs, self.chunking)

    def roots_of(self, source: str) -> set[str]:
        """The roots (indexed folders) that hold a document with this source path."""
        with self.lock.reading(), damage_reported(self.path):
            return self.follow_disk().roots_of(source)

    def remove_source(self, source: str, *, root: str | None = None) -> int:
        """Remove every document with this source path (only the one under ``root`` if given);
        returns how many were removed."""
        with self.lock.writing(), writer_lock(self.path), damage_reported(self.path):
            store = self._writable_store()
            ids = store.document_ids(source, root)
            if ids:
                with store.transaction():
                    store.remove_documents(ids)
            return len(ids)

    def version(self) -> tuple[int, int]:
        """(file, generation): changes whenever what the index holds changes (a ``--full``
        rebuild is another file, whose generations start again)."""
        with self.lock.reading(), damage_reported(self.path):
            store = self.follow_disk()
            return store.inode, store.generation

    def documents(self) -> list[dict[str, Any]]:
        """What the last committed run left: each document's source, title, format, number of
        chunks, time indexed and root (indexed folder), newest first."""
        with self.lock.reading(), damage_reported(self.path):
            return self.follow_disk().documents()

    def titles(self) -> dict[int, str]:
        """Every document's title by its id."""
        with self.lock.reading(), damage_reported(self.path):
            return self.follow_disk().titles()

    def document_text(self, document_id: int) -> str:
        """A document's text rebuilt from its chunks (overlaps removed)."""
        with self.lock.reading(), damage_reported(self.path):
            rows = self.follow_disk().document_chunks(document_id)
        parts, end = [], 0
        for text, start, stop in rows:
            if stop <= end:
                continue
            parts.append(("\n" if start > end and parts else "") + text[max(0, end - start) :])
            end = stop
        return "".join(parts)

    def stats(self) -> dict[str, Any]:
        with self.lock.reading(), damage_reported(self.path):
            documents, chunks = self.follow_disk().counts()
        return {
            "path": str(self.path),
            "documents": documents,
            "chunks": chunks,
            **self.store.manifest,
        }

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadWriteLock:
    """Many readers or one writer; a waiting writer goes before readers that come after it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def check_embedding_model(
    manifest: dict[str, Any], settings: Settings, path: Path, embedder: Embedder | None = None
) -> None:
    """An explicitly configured embedding model must be the one the index was built with."""
    built_with = manifest["embedding"]["model"]
    asked = embedder.name if embedder else None
    if asked is None and "embedding_model" in settings.model_fields_set:
        asked = settings.embedding_model
    if asked is not None and asked != built_with:
        raise EmbeddingModelError(
            f"the index at {path} was built with the embedding model {built_with!r}, but "
            f"{asked!r} was asked for: its vectors are not comparable. "
            f"Rebuild with `agentkit index DIR --index {path} --full`, or drop the setting"
        )


def index_folder(
    folder: str | Path,
    index_path: str | Path | None = None,
    *,
    full: bool = False,
    settings: Settings | None = None,
    progress: ProgressFn | None = None,
    embedder: Embedder | None = None,
    ray: str | None = None,
) -> SyncSummary:
    """Create or update the index at ``index_path`` from ``folder``.

    ``full`` rebuilds from scratch in a folder beside the index and swaps it in atomically at the
    end, so the previous index serves until the new one is complete; it also replaces a damaged
    index, which an incremental run refuses (``IndexCorruptError``). ``ray``: read, chunk and
    embed on the Ray cluster at that address ("local": one started here; see ``ray_indexer``),
    with this process the one writer.
    """
    settings = settings or get_settings()
    index_path = Path(index_path or settings.index).expanduser()

    def sync(index: Index) -> SyncSummary:
        if ray is not None:
            from .ray_indexer import embedder_factory, sync_folder_on_ray

            return sync_folder_on_ray(
                index.store,
                embedder_factory(index.embedder),
                Path(folder),
                index.chunking,
                progress,
                max_file_bytes=settings.max_file_bytes,
                address=ray,
            )
        return indexer.sync_folder(
            index.store,
            index.embedder,
            Path(folder),
            index.chunking,
            progress,
            max_file_bytes=settings.max_file_bytes,
        )

    with writer_lock(index_path):
        if full or not (index_path / SQLITE_FILE).exists():
            indexer.check_folder(Path(folder))  # fail before creating anything
            build = index_path.with_name(f".{index_path.name}.build-{os.getpid()}")
            shutil.rmtree(build, ignore_errors=True)
            try:
                with Index.create(build, settings=settings, embedder=embedder) as index:
                    summary = sync(index)
                indexer.replace_directory(index_path, build)
            finally:
                shutil.rmtree(build, ignore_errors=True)
            summary.index = str(index_path)
            return summary
        with Index.open(index_path, settings=settings, embedder=embedder) as index:
            with damage_reported(index_path):
                index.store.check_integrity()
                return sync(index)
