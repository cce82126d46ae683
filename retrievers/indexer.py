"""Bring an index up to date with a folder (or any documents): skip, replace, add, remove.

Everything one run changes is committed in one SQLite transaction (see ``store.py``).
Chunks are embedded in batches across documents, so the embedding batches stay full and
length-sorted, and memory stays bounded by the batch, not by the folder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agentkit.errors import AgentkitError, InvalidPathError
from agentkit.settings import Settings

from .chunking import TokenCounter, iter_chunks, line_number, line_starts_of
from .embedding import Embedder
from .loaders import NotIndexable, load_file, read_regular_file, supported_extensions, walk_files
from .store import IndexStore, chunk_id_for
from .types import ChunkSpan, LoadedDocument, SyncSummary

ProgressFn = Callable[[int, int, int], None]  # files done, files total, chunks embedded
EMBED_BATCH_CHUNKS = 256
DEFAULT_MAX_FILE_BYTES: int = Settings.model_fields["max_file_bytes"].default


@dataclass
class ChunkingParams:
    max_tokens: int
    overlap_tokens: int


class _DocumentWrite:
    """One document on its way into the index, possibly over several batches."""

    def __init__(self, doc: LoadedDocument, replaces: int | None) -> None:
        self.doc, self.replaces = doc, replaces
        self.document_id: int | None = None  # once its row is written
        self.line_starts = line_starts_of(doc.text) if doc.has_lines else None
        self.page_starts = line_starts_of(doc.text, "\f") if doc.format == "pdf" else None


@dataclass
class _Part:
    """The chunks of one document that one batch holds."""

    document: _DocumentWrite
    spans: list[ChunkSpan]
    first_ordinal: int
    last: bool  # the document's final part


class _Ingest:
    """Queues chunks of documents and writes them, embedded, in batches of
    ``EMBED_BATCH_CHUNKS``: a batch may hold many small documents or a piece of a large one.

    A batch is embedded in the background while the next one is read and chunked; the
    SQLite writes stay on the calling thread. At most two batches are held at once, whatever
    the size of a document.
    """

    def __init__(
        self, store: IndexStore, embedder: Embedder, params: ChunkingParams, summary: SyncSummary
    ) -> None:
        self.store, self.embedder, self.params, self.summary = store, embedder, params, summary
        self.pending: list[_Part] = []
        self.pending_chunks = 0
        self.in_flight: tuple[list[_Part], Future[np.ndarray]] | None = None
        self.background = ThreadPoolExecutor(1, thread_name_prefix="agentkit-ingest")
        self._counter: TokenCounter | None = None

    def add(self, doc: LoadedDocument, replaces: int | None) -> None:
        if self._counter is None:
            self._counter = self.embedder.counter
        document = _DocumentWrite(doc, replaces)
        spans: list[ChunkSpan] = []
        first = 0
        for span in iter_chunks(
            doc,
            self._counter,
            max_tokens=self.params.max_tokens,
            overlap_tokens=self.params.overlap_tokens,
        ):
            spans.append(span)
            self.pending_chunks += 1
            if self.pending_chunks >= EMBED_BATCH_CHUNKS:
                self.pending.append(_Part(document, spans, first, last=False))
                first, spans = first + len(spans), []
                self._submit()
        self.pending.append(_Part(document, spans, first, last=True))

    def _submit(self) -> None:
        """Start embedding the pending chunks, after writing the batch before them."""
        self._write_in_flight()
        texts = [span.embedding_text for part in self.pending for span in part.spans]
        self.in_flight = (self.pending, self.background.submit(self.embedder.embed, texts))
        self.pending, self.pending_chunks = [], 0

    def _write_in_flight(self) -> None:
        if self.in_flight is None:
            return
        batch, future = self.in_flight
        self.in_flight = None
        vectors = future.result()
        offset = 0
        for part in batch:
            document = part.document
            if document.document_id is None:
                if document.replaces is not None:
                    self.store.remove_documents([document.replaces])
                document.document_id = self.store.insert_document(document_row(document.doc))
            self.store.add_chunks(
                document.document_id,
                document.doc.title,
                chunk_rows(document, part.spans, part.first_ordinal),
                vectors[offset : offset + len(part.spans)],
            )
            offset += len(part.spans)
            if part.last:
                total = part.first_ordinal + len(part.spans)
                self.store.set_chunk_count(document.document_id, total)
                self.summary.updated += document.replaces is not None
                self.summary.added += document.replaces is None
        self.summary.chunks_embedded += len(vectors)

    def flush(self) -> None:
        """Embed and write everything queued."""
        if self.pending:
            self._submit()
        self._write_in_flight()

    def __enter__(self) -> _Ingest:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        # On an error, do not wait for a batch whose writes will be rolled back anyway.
        self.background.shutdown(wait=error_type is None, cancel_futures=True)


def document_row(doc: LoadedDocument) -> dict[str, object]:
    return {
        "root": doc.root,
        "source": doc.source,
        "title": doc.title,
        "format": doc.format,
        "content_hash": doc.content_hash,
        "has_lines": int(doc.has_lines),
    }


def chunk_rows(
    document: _DocumentWrite, spans: list[ChunkSpan], first_ordinal: int = 0
) -> list[dict[str, object]]:
    doc, lines, pages = document.doc, document.line_starts, document.page_starts
    rows = []
    for ordinal, span in enumerate(spans, first_ordinal):
        last_char = max(span.char_end - 1, span.char_start)
        rows.append(
            {
                "id": chunk_id_for(doc.root, doc.source, doc.content_hash, ordinal),
                "ordinal": ordinal,
                "heading": span.heading,
                "text": span.text,
                "char_start": span.char_start,
                "char_end": span.char_end,
                "line_start": line_number(lines, span.char_start) if lines else None,
                "line_end": line_number(lines, last_char) if lines else None,
                "page": line_number(pages, span.char_start) if pages else None,
                "n_tokens": span.n_tokens,
            }
        )
    return rows


def check_folder(folder: Path) -> Path:
    """The resolved folder, or InvalidPathError when it is missing or not a folder."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise InvalidPathError(f"{folder} does not exist: give the folder of documents to index")
    if not folder.is_dir():
        raise InvalidPathError(
            f"{folder} is not a folder: give the folder that holds the documents"
        )
    return folder.resolve()


def plan_folder(
    store: IndexStore, folder: Path
) -> tuple[Path, SyncSummary, list[Path], dict[str, tuple[int, str]]]:
    """What a sync of ``folder`` starts from: its resolved root, a summary holding the files
    skipped on the walk (links out, pipes, devices, other extensions), the files to read, and
    what the index holds of the folder (``document_hashes``). InvalidPathError when there is
    nothing to index and nothing indexed."""
    root = check_folder(folder)
    summary = SyncSummary(index=str(store.path))
    extensions = set(supported_extensions())

    def skip(path: Path, reason: str) -> None:
        summary.warnings.append(f"skipped {path.relative_to(root).as_posix()}: {reason}")
        summary.skipped += 1

    files = list(walk_files(root, summary.warnings, on_skip=skip))
    candidates = [f for f in files if f.suffix.lower() in extensions]
    summary.skipped += len(files) - len(candidates)
    known = store.document_hashes(str(root))
    if not candidates and not known:
        raise InvalidPathError(
            f"{folder} holds no files to index (looked for {', '.join(sorted(extensions))})"
        )
    return root, summary, candidates, known


def sync_folder(
    store: IndexStore,
    embedder: Embedder,
    folder: Path,
    params: ChunkingParams,
    progress: ProgressFn | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> SyncSummary:
    """Make the documents of ``folder`` in the index match the folder, in one transaction.

    Files are only read inside ``folder``: a symlink out of it, a named pipe or device, a
    file over ``max_file_bytes`` is skipped and reported, and leaves the index.
    """
    started = time.perf_counter()
    root, summary, candidates, known = plan_folder(store, folder)
    seen: set[str] = set()
    with store.transaction(), _Ingest(store, embedder, params, summary) as ingest:
        for done, path in enumerate(candidates, 1):
            source = path.relative_to(root).as_posix()
            seen.add(source)  # a file we fail to read keeps its previous version in the index
            try:
                raw = read_regular_file(path, root, max_file_bytes)
                content_hash = hashlib.sha256(raw).hexdigest()
                if known.get(source, (None, None))[1] == content_hash:
                    summary.unchanged += 1
                    continue
                doc = load_file(path, root, raw, content_hash)
            except (OSError, ValueError) as error:
                if isinstance(error, NotIndexable):
                    seen.discard(source)  # not a transient failure: its old version goes too
                summary.warnings.append(f"skipped {source}: {error}")
                summary.skipped += 1
                continue
            finally:
                if progress:
                    progress(done, len(candidates), summary.chunks_embedded)
            if doc is None:
                summary.skipped += 1
                continue
            summary.warnings.extend(doc.warnings)
            ingest.add(doc, known.get(source, (None, None))[0])
        ingest.flush()
        gone = [doc_id for source, (doc_id, _) in known.items() if source not in seen]
        store.remove_documents(gone)
        summary.removed = len(gone)
    if progress:
        progress(len(candidates), len(candidates), summary.chunks_embedded)
    summary.documents_total, summary.chunks_total = store.counts()
    summary.seconds = time.perf_counter() - started
    return summary


def add_documents(
    store: IndexStore,
    embedder: Embedder,
    docs: Iterable[LoadedDocument],
    params: ChunkingParams,
) -> SyncSummary:
    """Add or replace documents (matched by ``root`` and ``source``); unchanged ones are skipped."""
    started = time.perf_counter()
    summary = SyncSummary(index=str(store.path))
    known: dict[str, dict[str, tuple[int, str]]] = {}
    with store.transaction(), _Ingest(store, embedder, params, summary) as ingest:
        for doc in docs:
            hashes = known.setdefault(doc.root, store.document_hashes(doc.root))
            doc_id, content_hash = hashes.get(doc.source, (None, None))
            if content_hash == doc.content_hash:
                summary.unchanged += 1
                continue
            if doc_id == -1:
                raise AgentkitError(
                    f"the source {doc.source!r} appears twice in one call; give it once"
                )
            hashes[doc.source] = (-1, doc.content_hash)
            ingest.add(doc, doc_id)
        ingest.flush()
    summary.documents_total, summary.chunks_total = store.counts()
    summary.seconds = time.perf_counter() - started
    return summary


def exchange_directories(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE), else by two renames."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if (
        renameat2 is not None
        and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    ):
        return
    parked = a.with_name(a.name + f".old-{os.getpid()}")
    os.rename(a, parked)
    os.rename(b, a)
    os.rename(parked, b)


def replace_directory(target: Path, built: Path) -> None:
    """Put the freshly built index ``built`` at ``target``, then delete the old one."""
    if target.exists():
        exchange_directories(target, built)
        shutil.rmtree(built, ignore_errors=True)
    else:
        os.rename(built, target)
