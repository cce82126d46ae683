"""Helpers shared by the benchmarks: data paths, HotpotQA corpus, result files."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from agentkit.evaluation import load_hotpotqa  # noqa: F401  (re-exported for the benchmarks)
from agentkit.retrievers.embedding import cpu_info

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
        "cpu": cpu_info(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path


def relevant_titles(question: dict[str, Any]) -> set[str]:
    return {fact[0] for fact in question["supporting_facts"]}


def recall_at(ranked_titles: list[str], relevant: set[str], k: int) -> float:
    top = list(dict.fromkeys(ranked_titles))[:k]
    return len(relevant & set(top)) / len(relevant)
