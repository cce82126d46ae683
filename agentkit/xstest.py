"""`agentkit eval xstest`: over-refusal and unsafe compliance on XSTest (Röttger et al. 2024).

Each prompt goes through the runner (so through the context's guardrails), and each answer is
labelled by the refusal classifier (``agentkit.refusal``). For the safe prompts the report gives
the full and partial refusal rates (over-refusal); for the unsafe ones the full-compliance rate.
Rates are fractions. ``limit`` takes a balanced N in file order: the first N/2 safe and the first
N/2 unsafe prompts. ``split="held_out"`` keeps to the half of the prompts that no prompt or rule
of agentkit was written against (``agentkit.refusal.held_out``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from agentkit.agents import AgentContext, AgentRequest, run_agent
from agentkit.errors import AgentkitError, InvalidPathError
from agentkit.refusal import classify_refusal, confusion, held_out, read_csv

Split = Literal["all", "tuning", "held_out"]


def load_xstest(
    path: Path, *, limit: int | None = None, split: Split = "all"
) -> list[dict[str, str]]:
    """XSTest's prompts (``prompt``, ``label`` safe/unsafe, ``type``), balanced when limited."""
    rows = read_csv(path)
    if rows and not {"prompt", "label"} <= set(rows[0]):
        raise InvalidPathError(f"{path} is not XSTest's prompt file: it needs prompt and label")
    if split != "all":
        rows = [r for r in rows if held_out(r["prompt"]) == (split == "held_out")]
    if limit:
        safe = [r for r in rows if r["label"] == "safe"][: (limit + 1) // 2]
        unsafe = [r for r in rows if r["label"] == "unsafe"][: limit // 2]
        chosen = {id(r) for r in safe + unsafe}
        rows = [r for r in rows if id(r) in chosen]
    return rows


def rate(records: list[dict[str, Any]], label: str) -> float:
    return sum(r["refusal"] == label for r in records) / len(records) if records else 0.0


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's figures from its records."""
    safe = [r for r in records if r["label"] == "safe"]
    unsafe = [r for r in records if r["label"] == "unsafe"]
    latencies = [r["latency_s"] for r in records]
    verdicts: dict[str, list[tuple[str, str]]] = {}
    for record in records:
        for verdict in record.get("verdicts", []):
            said = "error" if verdict.get("error") else ("safe" if verdict["safe"] else "unsafe")
            verdicts.setdefault(verdict["stage"], []).append((record["label"], said))
    return {
        "safe": {
            "n": len(safe),
            "full_refusal": rate(safe, "full_refusal"),
            "partial_refusal": rate(safe, "partial_refusal"),
            "full_compliance": rate(safe, "full_compliance"),
        },
        "unsafe": {
            "n": len(unsafe),
            "full_compliance": rate(unsafe, "full_compliance"),
            "full_refusal": rate(unsafe, "full_refusal"),
            "partial_refusal": rate(unsafe, "partial_refusal"),
        },
        "mean_latency_s": statistics.fmean(latencies) if latencies else 0.0,
        "median_latency_s": statistics.median(latencies) if latencies else 0.0,
        "mean_tokens": statistics.fmean(r["tokens"] for r in records) if records else 0.0,
        "actions": {
            a: sum(r["action"] == a for r in records)
            for a in ("passed", "flagged", "blocked", "revised", "error")
        },
        "guard_confusion": {
            stage: confusion(pairs, ("safe", "unsafe")) for stage, pairs in verdicts.items()
        },
    }


def eval_xstest(
    context: AgentContext,
    data: Path,
    *,
    agent: str = "",
    limit: int | None = None,
    split: Split = "all",
    max_tokens: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run every prompt through ``agent`` (default: the served model) and label the answers."""
    rows = load_xstest(data, limit=limit, split=split)
    records = []
    for i, row in enumerate(rows):
        started = time.perf_counter()
        record: dict[str, Any] = {"prompt": row["prompt"], "label": row["label"],
                                  "type": row.get("type", "")}  # fmt: skip
        try:
            result = run_agent(
                agent,
                context,
                AgentRequest.ask(
                    row["prompt"], max_tokens=max_tokens, temperature=0.0
                ),  # fmt: skip
            )
        except AgentkitError as error:
            record.update(answer="", refusal="full_refusal", action="error", error=str(error),
                          verdicts=[], tokens=0)  # fmt: skip
        else:
            guard = result.data.get("guardrails", {})
            refusal = classify_refusal(result.text)
            record.update(
                answer=result.text,
                refusal="full_refusal" if guard.get("action") == "blocked" else refusal.label,
                action=guard.get("action", "passed"),
                verdicts=guard.get("verdicts", []),
                tokens=result.usage.total_tokens,
            )
            if "critique" in guard:
                record["critique"], record["original"] = guard["critique"], guard["original"]
        record["latency_s"] = time.perf_counter() - started
        records.append(record)
        if progress:
            progress(i + 1, len(rows))
    return {"split": split, "limit": limit, **summarize(records), "records": records}
