"""What tracing costs a RAG request's orchestration (retrieval, prompt, citations; the model is
scripted, so its time is not in it): the code as it was before instrumentation (baseline, in
this file), the instrumented code with tracing off, and with tracing on into the SDK's
in-memory exporter. Variants run interleaved, round by round, so drift hits them alike; each
figure is the median over rounds of a round's mean. Target: off within 1% of the baseline.

The cost of the off path is also bounded directly: the no-op ``span()`` calls of one request,
timed in a tight loop, as a share of the request.

    flock /tmp/agentkit-heavy.lock .venv/bin/python benchmarks/bench_tracing.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import SHARED, write_result

from agentkit import Index, index_folder, tracing
from agentkit.budget import fit_prompt
from agentkit.prompts import load_messages
from agentkit.rag import NO_ANSWER, RAG, Answer, CitationFilter, number_sources
from agentkit.retrievers.search import search
from agentkit.retrievers.store import damage_reported
from agentkit.settings import Settings
from agentkit.testing import HashingEmbedder, ScriptedChatModel

QUESTIONS = [
    "How do I declare a path parameter?",
    "How are query parameters validated?",
    "How do I return a custom response status code?",
    "What does Depends do?",
    "How do I add CORS middleware?",
    "How do background tasks work?",
    "How do I upload a file?",
    "How do I test an app with TestClient?",
]


def ask_uninstrumented(rag: RAG, question: str) -> Answer:
    """RAG.ask and Index.search as they were before tracing (the baseline)."""
    index = rag.index
    started = time.perf_counter()
    with index.lock.reading(), damage_reported(index.path):
        hits = search(
            index.follow_disk(),
            index.embedder,
            question,
            k=rag.k,
            mode="hybrid",
            max_query_chars=index.settings.max_query_chars,
        )
    relevant = [h for h in hits if (h.similarity or 0.0) >= rag.min_similarity]
    retrieved = time.perf_counter()
    answer = Answer(question=question, text=NO_ANSWER, answered=False)
    answer.timings["retrieve_s"] = retrieved - started
    if not relevant:
        return answer

    def build(kept: int) -> list[Any]:
        sources = number_sources(relevant[:kept]) or "(none)"
        return load_messages(rag.prompt, sources=sources, question=question)

    fitted = fit_prompt(rag.model, build, len(relevant), rag.max_tokens)
    answer.sources, answer.dropped_sources = relevant[: fitted.kept], relevant[fitted.kept :]
    answer.timings["prompt_s"] = time.perf_counter() - retrieved
    generated = time.perf_counter()
    completion = rag.model.complete(
        fitted.messages, max_tokens=fitted.max_tokens, temperature=rag.temperature
    )
    answer.timings["generate_s"] = time.perf_counter() - generated
    answer.usage = completion.usage
    check = CitationFilter(len(answer.sources))
    text = check.feed(completion.text) + check.flush()
    return rag.finish(answer, text, check.cited, check.invalid)


def round_mean(variant: str, rag: RAG, per_round: int) -> float:
    started = time.perf_counter()
    for i in range(per_round):
        question = QUESTIONS[i % len(QUESTIONS)]
        if variant == "baseline":
            ask_uninstrumented(rag, question)
        else:
            rag.ask(question)
    return (time.perf_counter() - started) / per_round


def off_path_ns(calls: int = 200_000) -> float:
    """One no-op ``with tracing.span(name, attributes) as s: s.set(...)``, in ns."""
    tracing.disable()
    started = time.perf_counter()
    for _ in range(calls):
        with tracing.span("retrieval", {"agentkit.retrieval.k": 5}) as traced:
            traced.set("agentkit.retrieval.hits", 5)
    return (time.perf_counter() - started) / calls * 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=25)
    parser.add_argument("--files", type=int, default=120, help="fastapi-docs files indexed")
    args = parser.parse_args()

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    source = SHARED / "data" / "docs" / "fastapi-docs"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        files = sorted(p for p in source.rglob("*.md"))[: args.files]
        for path in files:
            target = folder / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text(errors="replace"))
        settings = Settings(index=Path(tmp) / "index", cache_dir=Path(tmp) / "cache")
        embedder = HashingEmbedder(dim=256, max_tokens=256)
        index_folder(folder, settings.index, settings=settings, embedder=embedder)
        with Index.open(settings.index, settings=settings, embedder=embedder) as index:
            reply = "Declare it in the path [1] and type it [2]."
            rag = RAG(index, ScriptedChatModel(lambda *a, **k: reply), min_similarity=0.0)
            chunks = index.stats()["chunks"]
            variants = ["baseline", "off", "on"]
            samples: dict[str, list[float]] = {v: [] for v in variants}
            for v in variants:  # warm up caches and the first-use paths
                tracing.enable(provider) if v == "on" else tracing.disable()
                round_mean(v, rag, 5)
            for r in range(args.rounds):
                order = variants[r % 3 :] + variants[: r % 3]  # rotate who goes first
                for v in order:
                    tracing.enable(provider) if v == "on" else tracing.disable()
                    samples[v].append(round_mean(v, rag, args.per_round))
                    exporter.clear()
            tracing.disable()
            spans_per_request = 3  # invoke_agent, retrieval, chat

    median = {v: statistics.median(samples[v]) for v in variants}
    noop_ns = off_path_ns()
    base_ms = median["baseline"] * 1000
    result = {
        "what": "orchestration time of one RAG request (scripted model), ms: median of round means",
        "command": "flock /tmp/agentkit-heavy.lock .venv/bin/python benchmarks/bench_tracing.py "
        f"--rounds {args.rounds} --per-round {args.per_round} --files {args.files}",
        "index": {"files": len(files), "chunks": chunks, "embedder": "hashing, dim 256"},
        "rounds": args.rounds,
        "requests_per_round": args.per_round,
        "baseline_ms": round(base_ms, 4),
        "tracing_off_ms": round(median["off"] * 1000, 4),
        "tracing_on_in_memory_ms": round(median["on"] * 1000, 4),
        "overhead_off_pct": round((median["off"] / median["baseline"] - 1) * 100, 2),
        "overhead_on_pct": round((median["on"] / median["baseline"] - 1) * 100, 2),
        "round_spread_baseline_pct": round(
            (statistics.quantiles(samples["baseline"], n=4)[2] / min(samples["baseline"]) - 1)
            * 100,
            2,
        ),
        "noop_span_ns": round(noop_ns, 1),
        "spans_per_request": spans_per_request,
        "off_path_bound_pct": round(spans_per_request * noop_ns / 1e6 / base_ms * 100, 4),
        "target": "overhead_off_pct <= 1 (off_path_bound_pct: the no-op calls' own share)",
    }
    write_result("tracing", result)


if __name__ == "__main__":
    main()
