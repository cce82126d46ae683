"""Indexing on Ray (``index_folder(..., ray=...)``) against the single-process indexer, same
folder, same embedding model, same run; and the per-batch costs that model how it scales.

1. The baseline: ``index_folder`` in this process (cold, the real MiniLM model, ONNX int8).
2. Ray: a local Ray instance with this machine's CPUs (started before the clock runs, its
   start-up timed apart), ``index_folder(..., ray="local")`` into a fresh index.
3. The stages measured one by one in this process, without Ray: reading and chunking (seconds
   per file), embedding (seconds per chunk), and the one writer (seconds per chunk written into
   the index). ``scaling_model`` predicts the time on N nodes like this one: the embedding
   already uses every core of a node (ONNX Runtime's threads), so a node indexes at the rate
   measured here, r chunks/s, and N nodes at N·r until the one writer (1 / its cost per chunk)
   is the limit: ``T(N) = startup + overhead + chunks / min(N·r, writer rate)``, the overhead
   being what the Ray run took here beyond chunks / r.

    .venv/bin/python benchmarks/bench_ray_indexing.py --remodel results/ray_indexing.json
    recomputes the model from a result file's measurements.

    flock /tmp/agentkit-heavy.lock .venv/bin/python benchmarks/bench_ray_indexing.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SHARED, write_result

from agentkit import index_folder
from agentkit.retrievers import Index
from agentkit.retrievers.ray_indexer import (
    DOCUMENTS_PER_EMBED,
    FILES_PER_TASK,
    EmbedderSpec,
    EmbedDocuments,
    read_and_chunk,
    write_row,
)
from agentkit.retrievers.types import SyncSummary
from agentkit.settings import Settings


def stage_costs(folder: Path, scratch: Path, settings: Settings) -> dict:
    """Each stage alone, in this process: seconds per file (read+chunk), per chunk (embed,
    write)."""
    with Index.create(scratch / "stages", settings=settings) as index:
        spec = EmbedderSpec(index.embedder)
        params = (index.chunking.max_tokens, index.chunking.overlap_tokens)
        sources = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.md"))
        began = time.perf_counter()
        rows: dict[str, list] = {}
        for start in range(0, len(sources), FILES_PER_TASK):
            batch = {"source": np.array(sources[start : start + FILES_PER_TASK])}
            part = read_and_chunk(
                batch,
                root=str(folder),
                known={},
                params=params,
                max_file_bytes=settings.max_file_bytes,
                make_embedder=spec,
            )
            for key, values in part.items():
                rows.setdefault(key, []).extend(values)
        read_s = time.perf_counter() - began
        embedder = EmbedDocuments(spec)
        embedder.embedder.embed(["warm up"])  # the model's load is not a per-chunk cost
        began = time.perf_counter()
        embedded: dict[str, list] = {}
        for start in range(0, len(sources), DOCUMENTS_PER_EMBED):
            batch = {k: np.array(v[start : start + DOCUMENTS_PER_EMBED], dtype=object)
                     for k, v in rows.items()}  # fmt: skip
            for key, values in embedder(batch).items():
                embedded.setdefault(key, []).extend(values)
        embed_s = time.perf_counter() - began
        chunks = sum(len(json.loads(c) or []) for c in rows["chunks"])
        began = time.perf_counter()
        summary = SyncSummary(index="stages")
        with index.store.transaction():
            for i in range(len(sources)):
                write_row(index.store, {k: v[i] for k, v in embedded.items()}, {}, set(), summary)
        write_s = time.perf_counter() - began
    return {
        "files": len(sources),
        "chunks": chunks,
        "read_and_chunk_s": round(read_s, 3),
        "embed_s": round(embed_s, 3),
        "write_s": round(write_s, 3),
        "read_and_chunk_s_per_file": round(read_s / len(sources), 5),
        "embed_s_per_chunk": round(embed_s / chunks, 5),
        "write_s_per_chunk": round(write_s / chunks, 6),
    }


def scaling_model(results: dict) -> dict:
    """The time on N nodes like this one, from the measurements (see the module's docstring)."""
    costs, ray_run = results["stage_costs"], results["ray_local"]
    chunks = costs["chunks"]
    node_rate = chunks / (costs["read_and_chunk_s"] + costs["embed_s"])  # chunks/s of one node
    writer_rate = chunks / costs["write_s"]
    overhead = ray_run["seconds"] - chunks / node_rate

    def seconds(nodes: int) -> float:
        return ray_run["startup_seconds"] + overhead + chunks / min(nodes * node_rate, writer_rate)

    return {
        "formula": "T(N) = startup + overhead + chunks / min(N * node_rate, writer_rate)",
        "node_rate_chunks_per_second": round(node_rate, 1),
        "writer_rate_chunks_per_second": round(writer_rate),
        "overhead_seconds": round(overhead, 1),
        "nodes_until_the_writer_limits": int(writer_rate // node_rate),
        "predicted_seconds": {str(n): round(seconds(n), 1) for n in (1, 2, 4, 8, 16, 64, 256)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--folder", type=Path, default=SHARED / "data" / "docs" / "fastapi-docs" / "en"
    )
    parser.add_argument("--remodel", type=Path, help="recompute the model of a result file")
    args = parser.parse_args()
    if args.remodel:
        results = json.loads(args.remodel.read_text())
        results["model"] = scaling_model(results)
        args.remodel.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["model"], indent=1))
        return
    settings = Settings()
    scratch = Path(tempfile.mkdtemp(prefix="bench-ray-indexing-"))
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        began = time.perf_counter()
        single = index_folder(args.folder, scratch / "single", settings=settings)
        single_s = time.perf_counter() - began

        import ray

        began = time.perf_counter()
        ray.init(logging_level="WARNING", log_to_driver=False)
        startup_s = time.perf_counter() - began
        cpus = int(ray.cluster_resources().get("CPU", 1))
        began = time.perf_counter()
        spread = index_folder(args.folder, scratch / "ray", settings=settings, ray="local")
        ray_s = time.perf_counter() - began
        ray.shutdown()

        costs = stage_costs(args.folder.resolve(), scratch, settings)
        results = {
            "folder": str(args.folder),
            "cpus": cpus,
            "single_process": {"seconds": round(single_s, 2), "chunks": single.chunks_embedded,
                               "chunks_per_second": round(single.chunks_embedded / single_s, 1)},
            "ray_local": {"seconds": round(ray_s, 2), "startup_seconds": round(startup_s, 2),
                          "chunks": spread.chunks_embedded, "workers": cpus,
                          "chunks_per_second": round(spread.chunks_embedded / ray_s, 1)},
            "ray_over_single_throughput": round(single_s / ray_s, 2),
            "same_chunks": single.chunks_embedded == spread.chunks_embedded,
            "stage_costs": costs,
        }  # fmt: skip
        results["model"] = scaling_model(results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results, indent=1))
    print(write_result("ray_indexing", results))


if __name__ == "__main__":
    main()
