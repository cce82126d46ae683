"""`agentkit eval gsm8k`: accuracy of PAL vs chain-of-thought on GSM8K-format data."""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agentkit.errors import InvalidPathError, ModelServerError
from agentkit.llm import ChatModel
from agentkit.pal import PAL
from agentkit.prompts import load_messages
from agentkit.tools.sandbox import Sandbox

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
CITATION = re.compile(r"\s*\[\d+(?:\s*[,;]\s*\d+)*\]")
Item = TypeVar("Item")
Result = TypeVar("Result")


def map_in_order(
    score: Callable[[Item], Result],
    items: Sequence[Item],
    *,
    concurrency: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Result]:
    """``score`` of every item, ``concurrency`` at a time (threads; the model server batches the
    requests that arrive together), results in the items' order whatever order they finish in."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    results: list[Result] = []
    if concurrency == 1:
        for item in items:
            results.append(score(item))
            if progress:
                progress(len(results), len(items))
        return results
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="eval") as pool:
        futures = [pool.submit(score, item) for item in items]
        done = 0
        for future in futures:
            results.append(future.result())
            done += 1
            if progress:
                progress(done, len(items))
    return results


def load_jsonl(path: Path, limit: int | None = None, start: int = 0) -> list[dict[str, Any]]:
    """Rows ``start`` to ``start + limit`` (0-based, file order) of a JSONL file."""
    if not Path(path).is_file():
        raise InvalidPathError(f"no data file at {path}: pass a JSONL file with --data")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if start >= len(rows) > 0:
        raise InvalidPathError(f"{path} has {len(rows)} rows; --start {start} is past the end")
    return rows[start : start + limit] if limit else rows[start:]


def raise_if_all_failed(records: list[dict[str, Any]]) -> None:
    """A problem whose model call failed (e.g. timed out under load) is scored wrong and counted
    in ``model_errors``; when every one failed, the server is down: say so, not "accuracy 0"."""
    if records and all(r.get("error_type") == "model_error" for r in records):
        raise ModelServerError(f"every model call failed; the first: {records[0]['error']}")


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
    start: int = 0,
    mode: str = "pal",
    samples: int = 1,
    concurrency: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    if mode not in ("pal", "cot"):
        raise ValueError(f"unknown mode {mode!r}: use pal or cot")
    rows = load_jsonl(data, limit, start)
    sandbox = Sandbox() if mode == "pal" else None
    pal = PAL(model, sandbox, samples=samples) if sandbox else None

    def score(row: dict[str, Any]) -> dict[str, Any]:
        gold = gold_number(row["answer"])
        started = time.perf_counter()
        record: dict[str, Any] = {"question": row["question"], "gold": gold}
        try:
            predicted = solve(row, record)
        except ModelServerError as error:  # this problem is lost, not the whole evaluation
            predicted = None
            record.update(predicted=None, error_type="model_error", error=str(error))
        record["correct"] = same_number(predicted, gold)
        record["latency_s"] = time.perf_counter() - started
        return record

    def solve(row: dict[str, Any], record: dict[str, Any]) -> float | None:
        if pal is not None:
            answer = pal.solve(row["question"])
            predicted = as_number(answer.value)
            record.update(
                predicted=answer.value,
                error_type=answer.result.error_type,
                program=answer.program,
                repaired=any(s.repaired for s in answer.samples),
            )
        else:
            messages = load_messages("cot_gsm8k", question=row["question"])
            reply = model.complete(messages, temperature=0.0, max_tokens=400).text
            predicted = last_number(reply)
            record.update(predicted=predicted, error_type=None, reply=reply)
        return predicted

    started = time.perf_counter()
    try:
        records = map_in_order(score, rows, concurrency=concurrency, progress=progress)
    finally:
        if sandbox:
            sandbox.close()
    wall_s = time.perf_counter() - started
    raise_if_all_failed(records)
    n = len(records)
    errors = [r for r in records if r.get("error_type")]
    return {
        "mode": mode,
        "samples": samples,
        "items": [start, start + n],  # 0-based, end excluded: which rows of the file
        "n": n,
        "accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
        "execution_errors": sum(
            r["error_type"] not in (None, "timeout", "model_error") for r in errors
        ),
        "model_errors": sum(r["error_type"] == "model_error" for r in errors),
        "timeouts": sum(r["error_type"] == "timeout" for r in errors),
        "repaired": sum(bool(r.get("repaired")) for r in records),
        "mean_latency_s": statistics.fmean(r["latency_s"] for r in records) if n else 0.0,
        "concurrency": concurrency,
        "problems_per_minute": 60 * n / wall_s if wall_s > 0 else 0.0,
        "records": records,
    }


# --- HotpotQA ------------------------------------------------------------------------------


def load_hotpotqa(path: Path, limit: int | None = None) -> tuple[list[dict[str, Any]], list[Any]]:
    """The questions (first ``limit``), and every paragraph of every question in the file as
    one document per title (the distractors of the other questions make the corpus harder)."""
    from agentkit.retrievers import LoadedDocument

    rows = load_jsonl(path)
    paragraphs: dict[str, str] = {}
    for item in rows:
        for title, sentences in item["context"]:
            paragraphs.setdefault(title, " ".join(s.strip() for s in sentences))
    docs = [
        LoadedDocument(
            source=title,
            text=text,
            title=title,
            format="txt",
            content_hash=hashlib.sha1(text.encode()).hexdigest(),
            root="hotpotqa",
            has_lines=False,
        )
        for title, text in paragraphs.items()
    ]
    return (rows[:limit] if limit else rows), docs


def strip_citations(text: str) -> str:
    """The answer without its ``[n]`` / ``[1, 2]`` source markers ("Some Title [4]." -> "Some
    Title.")."""
    return CITATION.sub("", text)


def normalize_answer(text: str) -> str:
    """SQuAD/HotpotQA normalisation after the citation markers are stripped: lower case, no
    punctuation, articles or extra spaces."""
    text = strip_citations(text)
    text = re.sub(
        r"\b(a|an|the)\b", " ", "".join(c for c in text.lower() if c.isalnum() or c.isspace())
    )
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if normalize_answer(prediction) in ("yes", "no") or normalize_answer(gold) in ("yes", "no"):
        return float(normalize_answer(prediction) == normalize_answer(gold))
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def eval_hotpotqa(
    model: ChatModel,
    data: Path,
    index_path: Path,
    *,
    limit: int | None = None,
    mode: str = "react",
    structured: bool = True,
    max_steps: int = 8,
    concurrency: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    from agentkit.rag import RAG
    from agentkit.react import ReAct
    from agentkit.retrievers import Index

    if mode not in ("react", "rag", "cot"):
        raise ValueError(f"unknown mode {mode!r}: use react, rag or cot")
    questions, docs = load_hotpotqa(data, limit)
    with Index.open_or_create(index_path) as index:
        if index.stats().get("documents", 0) == 0:
            index.add_documents(docs)

        def score(item: dict[str, Any]) -> dict[str, Any]:
            started = time.perf_counter()
            record: dict[str, Any] = {
                "question": item["question"],
                "gold": item["answer"],
                "steps": 0,
                "parse_failures": 0,
                "tool_errors": 0,
                "fallback": False,
            }
            try:
                answer(item, record)
            except ModelServerError as error:  # this question is lost, not the evaluation
                record.update(prediction="", error_type="model_error", error=str(error))
            record["exact_match"] = float(
                normalize_answer(record["prediction"]) == normalize_answer(item["answer"])
            )
            record["f1"] = f1_score(record["prediction"], item["answer"])
            record["latency_s"] = time.perf_counter() - started
            return record

        def answer(item: dict[str, Any], record: dict[str, Any]) -> None:
            if mode == "react":
                result = ReAct(model, index=index, structured=structured, max_steps=max_steps).run(
                    item["question"]
                )
                record.update(
                    prediction=result.answer,
                    steps=len(result.steps),
                    parse_failures=result.parse_failures,
                    tool_errors=result.tool_errors,
                    fallback=result.fallback,
                    trajectory=[s.to_dict() for s in result.steps],
                )
            elif mode == "rag":
                answer = RAG(index, model, max_tokens=60, min_similarity=0.0).ask(
                    item["question"] + " Answer with a short phrase."
                )
                record["prediction"] = strip_citations(answer.text).strip().rstrip(".")
            else:
                reply = model.complete(
                    load_messages("cot_hotpotqa", question=item["question"]),
                    temperature=0.0,
                    max_tokens=120,
                ).text
                record["prediction"] = reply.split("Answer:")[-1].strip().split("\n")[0]
                record["reply"] = reply

        started = time.perf_counter()
        records = map_in_order(score, questions, concurrency=concurrency, progress=progress)
        wall_s = time.perf_counter() - started
    raise_if_all_failed(records)
    n = len(records) or 1
    return {
        "mode": mode,
        "n": len(records),
        "exact_match": sum(r["exact_match"] for r in records) / n,
        "f1": sum(r["f1"] for r in records) / n,
        "parse_failures": sum(r["parse_failures"] for r in records),
        "tool_errors": sum(r["tool_errors"] for r in records),
        "model_errors": sum(r.get("error_type") == "model_error" for r in records),
        "fallbacks": sum(r["fallback"] for r in records),
        "mean_steps": sum(r["steps"] for r in records) / n,
        "mean_latency_s": sum(r["latency_s"] for r in records) / n,
        "concurrency": concurrency,
        "problems_per_minute": 60 * len(records) / wall_s if wall_s > 0 else 0.0,
        "records": records,
    }
