"""Search latency p50/p95: the real fastapi-docs/en index (~2k chunks), query embedding
included; and a 100k-chunk index (the same chunks replicated with fresh ids), where the FAISS +
FTS5 part (no query embedding) is timed on its own. BM25 at that size ranks by the rarest query
terms within a postings budget (``search.bm25_terms``); the overlap of its top 50 with the
top 50 by every term says what that gives up.

    .venv/bin/python benchmarks/bench_search_latency.py [--folder DIR] [--chunks 100000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SHARED, load_hotpotqa, write_result

from agentkit import Index, index_folder
from agentkit.retrievers import search as S


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2),
    }


def originals(index: Index, chunk_ids: list[int]) -> set[tuple[int, int]]:
    """The chunks that ``chunk_ids`` are copies of, as (document, ordinal)."""
    marks = ",".join("?" * len(chunk_ids))
    rows = index.store.db.execute(
        f"SELECT document_id, ordinal FROM chunks WHERE id IN ({marks})", chunk_ids
    )
    return set(rows)


def replicate(index: Index, target: int) -> None:
    """Copy chunks (text, FTS row, vector) under new ids until the index holds ``target``."""
    db = index.store.db
    rows = db.execute(
        "SELECT c.*, v.embedding, d.title FROM chunks c JOIN vectors v ON v.chunk_id = c.id"
        " JOIN documents d ON d.id = c.document_id"
    ).fetchall()
    next_id = 1 << 40
    db.execute("BEGIN")
    while index.store.counts()[1] < target:
        batch_ids, batch_vectors = [], []
        for row in rows:
            chunk = list(row[:11])
            chunk[0] = next_id
            db.execute("INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,?,?,?)", chunk)
            db.execute(
                "INSERT INTO chunks_fts (rowid, title, heading, body) VALUES (?,?,?,?)",
                (next_id, row[12], row[3], row[4]),
            )
            batch_ids.append(next_id)
            batch_vectors.append(np.frombuffer(row[11], dtype=np.float32))
            next_id += 1
        index.store.vectors.add_with_ids(
            np.stack(batch_vectors), np.array(batch_ids, dtype=np.int64)
        )
    db.execute("COMMIT")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--folder", type=Path, default=SHARED / "data" / "docs" / "fastapi-docs" / "en"
    )
    parser.add_argument("--chunks", type=int, default=100_000)
    args = parser.parse_args()
    questions, _ = load_hotpotqa(SHARED / "data" / "hotpotqa" / "dev_100.jsonl")
    queries = [q["question"].strip() for q in questions] + [
        "how do I declare a query parameter",
        "dependency injection with yield",
        "CORS middleware",
        "upload a file",
        "OAuth2 password flow with JWT tokens",
        "background tasks after response",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index"
        index_folder(args.folder, path)
        with Index.open(path) as index:
            index.search("warm up", k=5)
            small_chunks = index.store.counts()[1]
            full_small = []
            for q in queries:
                t = time.perf_counter()
                index.search(q, k=5)
                full_small.append(time.perf_counter() - t)
            embed_small = []
            for q in queries:
                t = time.perf_counter()
                index.embedder.embed([q])
                embed_small.append(time.perf_counter() - t)
            replicate(index, args.chunks)
            large_chunks = index.store.counts()[1]
            vectors = {q: index.embedder.embed([q]) for q in queries}
            index.embedder.embed = lambda texts: vectors[
                texts[0]
            ]  # time retrieval without the model
            retrieval_large = []
            for q in queries:
                t = time.perf_counter()
                index.search(q, k=5)
                retrieval_large.append(time.perf_counter() - t)
            faiss_only, fts_only, overlap = [], [], []
            for q in queries:
                t = time.perf_counter()
                index.store.vectors.search(vectors[q], 50)
                faiss_only.append(time.perf_counter() - t)
                t = time.perf_counter()
                pruned = S.bm25_ranking(index.store, q, 50, prune=True)
                fts_only.append(time.perf_counter() - t)
                every_term = S.bm25_ranking(index.store, q, 50)  # what pruning gives up
                if every_term:  # compared as original chunks: the copies tie with each other
                    kept, wanted = originals(index, pruned), originals(index, every_term)
                    overlap.append(len(kept & wanted) / len(wanted))
    write_result(
        "search_latency",
        {
            "queries": len(queries),
            "small": {
                "chunks": small_chunks,
                "search_with_query_embedding": percentiles(full_small),
                "query_embedding_only": percentiles(embed_small),
            },
            "large": {
                "chunks": large_chunks,
                "search_without_query_embedding": percentiles(retrieval_large),
                "faiss_top50": percentiles(faiss_only),
                "fts5_bm25_top50": percentiles(fts_only),
                "bm25_top50_shared_with_every_term": round(statistics.mean(overlap), 3),
            },
            "targets": {"small_p50_ms": 15, "large_retrieval_ms": 10},
        },
    )


if __name__ == "__main__":
    main()
