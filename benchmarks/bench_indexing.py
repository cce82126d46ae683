"""Indexing speed: cold agentkit indexing vs the LangChain pipeline (same model, same run), then
re-indexing the unchanged folder, then after changing one file.

LangChain baseline: RecursiveCharacterTextSplitter(1000, 100) + HuggingFaceEmbeddings (same
MiniLM, fp32) + FAISS.from_documents. Both timings include loading the files and the model.
Token counts say how much text each side embedded: the baseline's 1,000-character chunks are
cut at the model's 256 tokens; ours are sized to fit, with a title/heading prefix each.

Before the timed runs, the configured embedding backend is resolved once, untimed: with
``auto`` on a CPU that is the one-time measurement of the backends on this machine (cached
beside the ONNX export, as the export itself), whose figures the result records.

    .venv/bin/python benchmarks/bench_indexing.py [--folder DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from common import SHARED, write_result

from agentkit import Index, index_folder
from agentkit.retrievers.embedding import Embedder, available_cores, resolve_model_path
from agentkit.settings import get_settings


def langchain_pipeline(folder: Path) -> dict:
    from langchain_community.vectorstores import FAISS
    from langchain_huggingface import HuggingFaceEmbeddings
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    started = time.perf_counter()
    files = sorted(folder.rglob("*.md"))
    splitter = RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=100)
    docs = splitter.create_documents(
        [f.read_text() for f in files], [{"source": str(f)} for f in files]
    )
    embeddings = HuggingFaceEmbeddings(
        model_name=resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"),
        model_kwargs={"device": "cpu"},
        encode_kwargs={"normalize_embeddings": True},
    )
    FAISS.from_documents(docs, embeddings)
    seconds = time.perf_counter() - started
    # Untimed: how much of the text the model saw (it truncates at max_seq_length).
    tokenizer = embeddings._client.tokenizer
    limit = embeddings._client.max_seq_length
    lengths = [len(tokenizer(d.page_content)["input_ids"]) for d in docs]
    return {
        "chunks": len(docs),
        "seconds": round(seconds, 2),
        "chunks_per_second": round(len(docs) / seconds, 2),
        "tokens_embedded": sum(min(n, limit) for n in lengths),
        "chunks_truncated": sum(n > limit for n in lengths),
        "tokens_truncated_away": sum(max(n - limit, 0) for n in lengths),
    }


def tokens_embedded(index: Path) -> int:
    """Tokens the model saw for all chunks (prefix and special tokens included)."""
    with sqlite3.connect(index / "index.sqlite") as db:
        return int(db.execute("SELECT sum(n_tokens) + 2 * count(*) FROM chunks").fetchone()[0])


def resolve_backend() -> dict:
    """The backend the configured setting resolves to on this machine (``auto`` measures the
    backends once and caches the choice), and the measured chunks/s it chose by."""
    embedder = Embedder.from_settings(get_settings())
    started = time.perf_counter()
    resolved = {"backend": embedder.backend, "seconds": round(time.perf_counter() - started, 2)}
    if embedder.choice is not None:  # auto on a CPU
        resolved["choice"] = {
            "reason": embedder.choice.reason,  # "measured" in this run, or "cached" earlier
            "chunks_per_second": embedder.choice.rates,
            "measured_at": embedder.choice.measured_at,
        }
    return resolved


def embedding_runtime(resolved: dict, index: Path) -> dict:
    """What ran the embeddings: the backend setting, what it resolved to and the index used, the
    runtimes' versions and threads (the per-machine differences in this benchmark's figures come
    from here and from the CPU)."""
    import importlib.metadata

    import torch

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cores = available_cores()
    with Index.open(index) as opened:
        used = opened.store.manifest["embedding"]["backend"]
    return {
        "backend_setting": get_settings().embedding_backend,
        "backend_resolved": resolved,
        "backend_used": used,
        "onnxruntime": version("onnxruntime"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cores_available": cores,
        "onnx_sessions": min(2, cores),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--folder", type=Path, default=SHARED / "data" / "docs" / "fastapi-docs" / "en"
    )
    args = parser.parse_args()
    resolved = resolve_backend()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        shutil.copytree(args.folder, folder)
        index = Path(tmp) / "index"
        baseline = langchain_pipeline(folder)
        cold = index_folder(folder, index, full=True)
        cold_tokens = tokens_embedded(index)
        warm = index_folder(folder, index)
        changed_file = sorted(folder.rglob("*.md"))[0]
        changed_file.write_text(
            changed_file.read_text() + "\n\nOne more paragraph, added by the benchmark.\n"
        )
        one = index_folder(folder, index)
        runtime = embedding_runtime(resolved, index)
    ours_rate = cold.chunks_per_second
    write_result(
        "indexing",
        {
            "folder": str(args.folder),
            "embedding_runtime": runtime,
            "langchain": baseline,
            "agentkit_cold": {
                "chunks": cold.chunks_embedded,
                "seconds": round(cold.seconds, 2),
                "chunks_per_second": round(ours_rate, 2),
                "documents": cold.documents_total,
                "tokens_embedded": cold_tokens,
                "chunks_truncated": 0,
            },
            "speedup_chunks_per_second": round(ours_rate / baseline["chunks_per_second"], 2),
            "speedup_folder_time": round(baseline["seconds"] / cold.seconds, 2),
            "agentkit_reindex_unchanged": {
                "seconds": round(warm.seconds, 4),
                "unchanged": warm.unchanged,
                "chunks_embedded": warm.chunks_embedded,
            },
            "reindex_speedup_vs_cold": round(cold.seconds / max(warm.seconds, 1e-9), 1),
            "agentkit_one_file_changed": {
                "seconds": round(one.seconds, 3),
                "updated": one.updated,
                "chunks_embedded": one.chunks_embedded,
            },
        },
    )


if __name__ == "__main__":
    main()
