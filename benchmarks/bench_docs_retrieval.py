"""Retrieval on a documentation folder: Markdown embedded as the model should read it (link
targets, image sources, heading attributes and inline HTML left out) vs as written, one run.

44 questions about ``fastapi-docs/en`` written for this benchmark (``docs_questions.jsonl``; the
expected file, and for release-note questions a phrase the right chunk holds). A hit is right
when its source is the expected file (and its text holds the phrase). Both indexes are built
from the same folder with the same embedder; "as written" is the chunking before the Markdown
view existed (``markdown_view`` returning nothing), which embeds ~1.5x the tokens.

    .venv/bin/python benchmarks/bench_docs_retrieval.py [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from unittest import mock

from bench_indexing import tokens_embedded
from common import ROOT, SHARED, write_result

from agentkit import Index, index_folder
from agentkit.retrievers import chunking

QUESTIONS = ROOT / "benchmarks" / "docs_questions.jsonl"
KS = (1, 5)


def right(hit, question: dict) -> bool:  # noqa: ANN001 - a retrievers Hit
    return hit.source == question["source"] and question.get("contains", "") in hit.text


def scores(index: Path, questions: list[dict], mode: str) -> dict:
    ranks = []
    with Index.open(index) as opened:
        for question in questions:
            hits = opened.search(question["question"], k=10, mode=mode)
            rank = next((i for i, hit in enumerate(hits, 1) if right(hit, question)), None)
            ranks.append(rank)
    n = len(ranks)
    result = {f"recall@{k}": round(sum(r is not None and r <= k for r in ranks) / n, 3) for k in KS}
    result["mrr@10"] = round(sum(1 / r for r in ranks if r) / n, 3)
    result["ranks"] = ranks
    return result


def build(folder: Path, index: Path, markdown_view: bool) -> dict:
    if markdown_view:
        summary = index_folder(folder, index, full=True)
    else:
        with mock.patch.object(chunking, "markdown_view", lambda text: ""):
            summary = index_folder(folder, index, full=True)
    return {"seconds": round(summary.seconds, 1), "chunks": summary.chunks_embedded,
            "tokens_embedded": tokens_embedded(index)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--folder", type=Path, default=SHARED / "data" / "docs" / "fastapi-docs" / "en"
    )
    args = parser.parse_args()
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, view in [("as_written", False), ("markdown_view", True)]:
            index = Path(tmp) / name
            results[name] = build(args.folder, index, view)
            for mode in ("hybrid", "dense"):
                results[name][mode] = scores(index, questions, mode)
    write_result(
        "docs_retrieval",
        {"folder": str(args.folder), "questions": len(questions), **results,
         "token_ratio": round(results["markdown_view"]["tokens_embedded"]
                              / results["as_written"]["tokens_embedded"], 3)},
    )  # fmt: skip


if __name__ == "__main__":
    main()
