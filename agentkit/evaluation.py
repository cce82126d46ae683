"""`agentkit eval gsm8k`: accuracy of PAL vs chain-of-thought on GSM8K-format data."""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentkit.errors import InvalidPathError
from agentkit.llm import ChatModel
from agentkit.pal import PAL
from agentkit.prompts import load_messages
from agentkit.tools.sandbox import Sandbox

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def load_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        raise InvalidPathError(f"no data file at {path}: pass a JSONL file with --data")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def gold_number(answer: str) -> float:
    """The number after ``####`` in a GSM8K answer."""
    return float(answer.split("####")[-1].strip().replace(",", "").replace("$", ""))


def last_number(text: str) -> float | None:
    """The number a prose answer ends on ("The answer is 1,234.")."""
    tail = text.split("The answer is")[-1] if "The answer is" in text else text
    numbers = NUMBER.findall(tail) or NUMBER.findall(text)
    try:
        return float(numbers[-1].replace(",", "")) if numbers else None
    except ValueError:
        return None


def as_number(value: Any) -> float | None:
    try:
        return float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def same_number(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-4 * max(1.0, abs(b))


def eval_gsm8k(
    model: ChatModel,
    data: Path,
    *,
    limit: int | None = None,
    mode: str = "pal",
    samples: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    rows = load_jsonl(data, limit)
    records = []
    sandbox = Sandbox() if mode == "pal" else None
    pal = PAL(model, sandbox, samples=samples) if sandbox else None
    for i, row in enumerate(rows):
        gold = gold_number(row["answer"])
        started = time.perf_counter()
        record: dict[str, Any] = {"question": row["question"], "gold": gold}
        if pal is not None:
            answer = pal.solve(row["question"])
            predicted = as_number(answer.value)
            record.update(
                predicted=answer.value,
                error_type=answer.result.error_type,
                program=answer.program,
                repaired=any(s.repaired for s in answer.samples),
            )
        elif mode == "cot":
            messages = load_messages("cot_gsm8k", question=row["question"])
            reply = model.complete(messages, temperature=0.0, max_tokens=400).text
            predicted = last_number(reply)
            record.update(predicted=predicted, error_type=None, reply=reply)
        else:
            raise ValueError(f"unknown mode {mode!r}: use pal or cot")
        record["correct"] = same_number(predicted, gold)
        record["latency_s"] = time.perf_counter() - started
        records.append(record)
        if progress:
            progress(i + 1, len(rows))
    if sandbox:
        sandbox.close()
    n = len(records)
    errors = [r for r in records if r.get("error_type")]
    return {
        "mode": mode,
        "samples": samples,
        "n": n,
        "accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
        "execution_errors": sum(r["error_type"] not in (None, "timeout") for r in errors),
        "timeouts": sum(r["error_type"] == "timeout" for r in errors),
        "repaired": sum(bool(r.get("repaired")) for r in records),
        "mean_latency_s": statistics.fmean(r["latency_s"] for r in records) if n else 0.0,
        "records": records,
    }
