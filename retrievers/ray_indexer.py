"""Indexing a folder on a Ray cluster (``agentkit index DIR --ray [ADDRESS]``).

Reading, loading and chunking the files run as Ray Data ``map_batches`` tasks, embedding as a
``map_batches`` actor pool (each actor loads the embedding model once); the results stream back
to this process, the one writer, which writes them into the index as ``sync_folder`` does: in
one transaction (all or nothing, crash-safe), unchanged files skipped by their content hash,
changed ones replaced, deleted ones removed, a file that must not be read (a link out of the
folder, too big) removed and one that failed to read kept as it was.

Every node reads the files by their path: on a cluster of several machines the folder must be
at the same path on each (a shared file system). Rows cross the cluster as plain columns (JSON
text and float32 bytes), never pickled objects of ours.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agentkit.errors import AgentkitError

from .chunking import iter_chunks
from .embedding import Embedder
from .indexer import (
    DEFAULT_MAX_FILE_BYTES,
    ChunkingParams,
    ProgressFn,
    _DocumentWrite,
    chunk_rows,
    document_row,
    plan_folder,
)
from .loaders import NotIndexable, load_file, read_regular_file
from .store import IndexStore
from .types import SyncSummary

FILES_PER_TASK = 16  # files one read-and-chunk task handles
DOCUMENTS_PER_EMBED = 32  # documents one embedding call takes (their chunks, together)
MakeEmbedder = Callable[[], Any]  # picklable; builds the embedder on a worker
# Ray's logical CPUs of an embedding actor and of a reading task: together one CPU, so that
# actors on every CPU never leave the reading tasks without one (Ray would wait forever).
ACTOR_CPUS, TASK_CPUS = 0.75, 0.25


class RayUnavailable(AgentkitError):
    """Ray is not installed, or the cluster cannot be reached."""


class EmbedderSpec:
    """What builds the index's embedder on a Ray worker (picklable: names, not a model)."""

    def __init__(self, embedder: Embedder) -> None:
        self.name, self.backend = embedder.name, embedder.requested_backend
        self.device, self.batch_size = embedder.device, embedder.batch_size
        self.cache_dir = embedder.cache_dir

    @property
    def key(self) -> str:
        return f"{self.name}\0{self.backend}"

    def __call__(self) -> Embedder:
        return Embedder(self.name, backend=self.backend, device=self.device,
                        batch_size=self.batch_size, cache_dir=self.cache_dir)  # fmt: skip


class GivenEmbedder:
    """An embedder of the caller's own (tests, custom models), shipped to the workers as it is;
    it must pickle."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.key = f"given\0{embedder.name}"

    def __call__(self) -> Any:
        return self.embedder


def embedder_factory(embedder: Any) -> MakeEmbedder:
    """What builds ``embedder`` again on a worker."""
    return EmbedderSpec(embedder) if isinstance(embedder, Embedder) else GivenEmbedder(embedder)


_counters: dict[str, Any] = {}  # per worker process: the token counter of each embedder


def read_and_chunk(
    batch: dict[str, np.ndarray],
    *,
    root: str,
    known: dict[str, str],
    params: tuple[int, int],
    max_file_bytes: int,
    make_embedder: MakeEmbedder,
) -> dict[str, list[Any]]:
    """A Ray Data batch of ``source`` paths → one row each: ``state`` (unchanged, skipped, gone,
    empty or document), ``message``, and for a document its row, chunk rows and texts to embed
    (JSON)."""
    key = getattr(make_embedder, "key", str(id(make_embedder)))
    counter = _counters.get(key)
    if counter is None:
        counter = _counters[key] = make_embedder().counter
    folder = Path(root)
    out: dict[str, list[Any]] = {"source": [], "state": [], "message": [], "document": [],
                                 "chunks": [], "texts": []}  # fmt: skip

    def emit(source: str, state: str, message: str = "", document: Any = None,
             chunks: Any = None, texts: Any = None) -> None:  # fmt: skip
        for key, value in (("source", source), ("state", state), ("message", message),
                           ("document", json.dumps(document)), ("chunks", json.dumps(chunks)),
                           ("texts", json.dumps(texts))):  # fmt: skip
            out[key].append(value)

    for source in batch["source"]:
        source = str(source)
        path = folder / source
        try:
            raw = read_regular_file(path, folder, max_file_bytes)
            content_hash = hashlib.sha256(raw).hexdigest()
            if known.get(source) == content_hash:
                emit(source, "unchanged")
                continue
            doc = load_file(path, folder, raw, content_hash)
        except (OSError, ValueError) as error:
            emit(source, "gone" if isinstance(error, NotIndexable) else "skipped", str(error))
            continue
        if doc is None:
            emit(source, "empty")
            continue
        spans = list(iter_chunks(doc, counter, max_tokens=params[0], overlap_tokens=params[1]))
        rows = chunk_rows(_DocumentWrite(doc, None), spans)
        emit(source, "document", "\n".join(doc.warnings), document_row(doc), rows,
             [span.embedding_text for span in spans])  # fmt: skip
    return out


class EmbedDocuments:
    """A Ray Data actor: embeds the chunks of a batch of documents in one call; ``vectors`` is
    each document's float32 matrix as bytes (empty for rows that are not documents)."""

    def __init__(self, make_embedder: MakeEmbedder) -> None:
        self.embedder = make_embedder()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        texts = [json.loads(t) or [] for t in batch["texts"]]
        flat = [text for document in texts for text in document]
        vectors = self.embedder.embed(flat) if flat else np.zeros((0, 1), np.float32)
        out, offset = [], 0
        for document in texts:
            out.append(np.asarray(vectors[offset : offset + len(document)], np.float32).tobytes())
            offset += len(document)
        return {**{k: list(v) for k, v in batch.items() if k != "texts"}, "vectors": out}


def connect(address: str | None) -> Callable[[], None]:
    """Join the Ray cluster at ``address`` (None or "local": a local one started here);
    returns what leaves it again."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("indexing on Ray needs Ray: pip install 'agentkit[ray]'") from None
    if ray.is_initialized():
        return lambda: None
    options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
    if address not in (None, "local"):
        options["address"] = address
        host = address.rpartition(":")[0]
        if host.startswith("127."):  # a cluster on this machine's loopback: so is this driver
            options["_node_ip_address"] = host
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RayUnavailable(
            f"cannot join the Ray cluster at {address} ({error}); start it with `ray start "
            "--head`, or leave the address out for a local one"
        ) from None
    return ray.shutdown


def sync_folder_on_ray(
    store: IndexStore,
    make_embedder: MakeEmbedder,
    folder: Path,
    params: ChunkingParams,
    progress: ProgressFn | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    *,
    address: str | None = None,
    embedding_actors: int | None = None,
) -> SyncSummary:
    """``indexer.sync_folder``'s result, with the reading, chunking and embedding done on Ray.

    ``embedding_actors``: how many embedding actors (default: one per CPU of the cluster; Ray
    fuses the reading and chunking into them, so they are the workers)."""
    started = time.perf_counter()
    root, summary, paths, known = plan_folder(store, folder)
    candidates = [path.relative_to(root).as_posix() for path in paths]
    seen: set[str] = set()
    if not candidates:  # nothing to read: what the index holds of the folder goes
        with store.transaction():
            summary.removed = len(known)
            store.remove_documents(doc_id for doc_id, _ in known.values())
        summary.documents_total, summary.chunks_total = store.counts()
        summary.seconds = time.perf_counter() - started
        return summary
    leave = connect(address)
    try:
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        actors = embedding_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        dataset = (
            ray.data.from_items([{"source": s} for s in candidates])
            .map_batches(
                read_and_chunk,
                batch_size=FILES_PER_TASK,
                batch_format="numpy",
                fn_kwargs={
                    "root": str(root),
                    "known": {source: digest for source, (_, digest) in known.items()},
                    "params": (params.max_tokens, params.overlap_tokens),
                    "max_file_bytes": max_file_bytes,
                    "make_embedder": make_embedder,
                },
                num_cpus=TASK_CPUS,
            )
            .map_batches(
                EmbedDocuments,
                batch_size=DOCUMENTS_PER_EMBED,
                batch_format="numpy",
                fn_constructor_kwargs={"make_embedder": make_embedder},
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=ACTOR_CPUS,
            )
        )
        with store.transaction():
            for done, row in enumerate(dataset.iter_rows(), 1):
                write_row(store, row, known, seen, summary)
                if progress:
                    progress(done, len(candidates), summary.chunks_embedded)
            gone = [doc_id for source, (doc_id, _) in known.items() if source not in seen]
            store.remove_documents(gone)
            summary.removed = len(gone)
    finally:
        leave()
    summary.documents_total, summary.chunks_total = store.counts()
    summary.seconds = time.perf_counter() - started
    return summary


def write_row(
    store: IndexStore,
    row: dict[str, Any],
    known: dict[str, tuple[int, str]],
    seen: set[str],
    summary: SyncSummary,
) -> None:
    """One file's result, written as ``sync_folder`` writes it (inside its transaction)."""
    source, state = str(row["source"]), str(row["state"])
    if state != "gone":  # a file that failed to read keeps its previous version
        seen.add(source)
    if state == "unchanged":
        summary.unchanged += 1
        return
    if state in ("skipped", "gone"):
        summary.warnings.append(f"skipped {source}: {row['message']}")
        summary.skipped += 1
        return
    if state == "empty":
        summary.skipped += 1
        return
    if row["message"]:
        summary.warnings.extend(str(row["message"]).split("\n"))
    document, chunks = json.loads(row["document"]), json.loads(row["chunks"])
    vectors = np.frombuffer(row["vectors"], np.float32)
    vectors = vectors.reshape(len(chunks), -1) if chunks else vectors.reshape(0, 0)
    replaces = known.get(source, (None, None))[0]
    if replaces is not None:
        store.remove_documents([replaces])
    document_id = store.insert_document(document)
    if chunks:
        store.add_chunks(document_id, document["title"], chunks, vectors)
    store.set_chunk_count(document_id, len(chunks))
    summary.updated += replaces is not None
    summary.added += replaces is None
    summary.chunks_embedded += len(chunks)
