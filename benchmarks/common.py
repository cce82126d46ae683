"""Helpers shared by the benchmarks: data paths, HotpotQA corpus, result files."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from agentkit.evaluation import load_hotpotqa  # noqa: F401  (re-exported for the benchmarks)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"


# The instructions that decide which int8 and float kernels run (oneDNN, ONNX Runtime's MLAS).
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
)


def cpu_info() -> dict[str, Any]:
    """The CPU model and the kernel-relevant flags from /proc/cpuinfo (figures differ by both)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first core's
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        # family/model/stepping tell generations apart where a VM shows only "AMD EPYC"
        # (family 23 model 1 is Zen 1, 49 Zen 2; family 25 is Zen 3/4)
        "family_model_stepping": [fields.get(k) for k in ("cpu family", "model", "stepping")],
        "flags": [f for f in KERNEL_FLAGS if f in flags],
    }


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
