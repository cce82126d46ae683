"""Peak RSS while indexing a folder (default: all of fastapi-docs, 1,656 files in 13 languages),
compared with indexing its `en/` part only, each in a fresh process.

    .venv/bin/python benchmarks/bench_index_memory.py [--folder DIR] [--small DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import SHARED, write_result

CHILD = """
import json, resource, sys
from agentkit import index_folder
summary = index_folder(sys.argv[1], sys.argv[2], full=True)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({**summary.to_dict(), "peak_rss_mb": peak_mb}))
"""


def measure(folder: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder), f"{tmp}/index"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {
        "folder": str(folder),
        "bytes": size,
        "documents": result["documents_total"],
        "chunks": result["chunks_total"],
        "seconds": round(result["seconds"], 1),
        "chunks_per_second": result["chunks_per_second"],
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    docs = SHARED / "data" / "docs" / "fastapi-docs"
    parser.add_argument("--folder", type=Path, default=docs)
    parser.add_argument("--small", type=Path, default=docs / "en")
    args = parser.parse_args()
    small, large = measure(args.small), measure(args.folder)
    write_result(
        "index_memory",
        {
            "small": small,
            "large": large,
            "corpus_growth": round(large["bytes"] / small["bytes"], 2),
            "rss_growth": round(large["peak_rss_mb"] / small["peak_rss_mb"], 2),
            "target_peak_rss_mb": 2048,
            "meets_target": large["peak_rss_mb"] <= 2048,
        },
    )


if __name__ == "__main__":
    main()
