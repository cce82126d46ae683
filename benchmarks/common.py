"""Helpers shared by the benchmarks: data paths, HotpotQA corpus, result files."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from agentkit.retrievers.types import LoadedDocument

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path


def load_hotpotqa(path: Path) -> tuple[list[dict[str, Any]], list[LoadedDocument]]:
    """Questions, and every paragraph of every question as one document per title."""
    questions, paragraphs = [], {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        questions.append(item)
        for title, sentences in item["context"]:
            paragraphs.setdefault(title, " ".join(s.strip() for s in sentences))
    docs = [
        LoadedDocument(
            source=title,
            text=text,
            title=title,
            format="txt",
            content_hash=str(hash(text)),
            root="hotpotqa",
            has_lines=False,
        )
        for title, text in paragraphs.items()
    ]
    return questions, docs


def relevant_titles(question: dict[str, Any]) -> set[str]:
    return {fact[0] for fact in question["supporting_facts"]}


def recall_at(ranked_titles: list[str], relevant: set[str], k: int) -> float:
    top = list(dict.fromkeys(ranked_titles))[:k]
    return len(relevant & set(top)) / len(relevant)
