"""Issue 3 benchmarks against the real vLLM server.

1. Orchestration overhead of `ask` on the sample folder: wall time of ``RAG.ask`` minus the
   server's own time for the generation (vLLM's ``vllm:e2e_request_latency_seconds`` sum,
   read from ``/metrics`` before and after). Target: ≤ 5 % of the total and ≤ 50 ms.
2. Client throughput: 16 concurrent requests with our async client vs the official ``openai``
   client, same requests (fixed length: ``ignore_eos``), rounds alternated. Target ratio ≥ 0.95.

Starts the embedded model with ``ModelServer`` unless ``AGENTKIT_LLM_URL`` names a server.
``--device cuda --model NAME`` runs the same on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from common import ROOT, write_result

from agentkit import Index, Settings, index_folder
from agentkit.llm import OpenAIChatModel
from agentkit.rag import RAG
from agentkit.services.model_server import ModelServer, ServeOptions

QUESTIONS = [
    "What was the code name of the first release?",
    "Where does the index live?",
    "How many dimensions do the default vectors have?",
    "What happens to scanned PDFs without a text layer?",
]


def server_seconds(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(r"^vllm:e2e_request_latency_seconds_sum\{[^}]*\} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def overhead(url: str, index_path: Path, rounds: int) -> dict[str, object]:
    records = []
    with Index.open(index_path) as index, OpenAIChatModel(url) as model:
        rag = RAG(index, model, max_tokens=48)
        rag.ask(QUESTIONS[0])  # warm: embedder, HTTP connection, server prefix cache
        for i in range(rounds):
            question = QUESTIONS[i % len(QUESTIONS)]
            before = server_seconds(url)
            started = time.perf_counter()
            answer = rag.ask(question)
            total = time.perf_counter() - started
            in_server = server_seconds(url) - before
            records.append(
                {
                    "question": question,
                    "total_s": total,
                    "server_s": in_server,
                    "outside_s": total - in_server,
                    "retrieve_s": answer.timings["retrieve_s"],
                    "prompt_s": answer.timings.get("prompt_s", 0.0),
                    "completion_tokens": answer.usage.completion_tokens,
                }
            )
    outside = statistics.median(r["outside_s"] for r in records)
    total = statistics.median(r["total_s"] for r in records)
    return {
        "rounds": rounds,
        "median_total_s": total,
        "median_outside_server_s": outside,
        "outside_share": outside / total,
        "median_retrieve_s": statistics.median(r["retrieve_s"] for r in records),
        "median_prompt_s": statistics.median(r["prompt_s"] for r in records),
        "target": "outside_share <= 0.05 and median_outside_server_s <= 0.050",
        "met": outside / total <= 0.05 and outside <= 0.050,
        "records": records,
    }


async def fire(send, n: int) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(send(i) for i in range(n)))
    return time.perf_counter() - started


async def throughput(url: str, concurrency: int, tokens: int, rounds: int) -> dict[str, object]:
    from openai import AsyncOpenAI

    extra = {"ignore_eos": True}  # every request makes exactly `tokens` tokens
    ours = OpenAIChatModel(url, extra_body=extra)
    name = ours.model
    theirs = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=3, timeout=600)

    def messages(i: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Count upwards from {i}, one number per line."}]

    async def send_ours(i: int) -> None:
        done = await ours.acomplete(messages(i), max_tokens=tokens, temperature=0.0)
        assert done.usage.completion_tokens == tokens

    async def send_theirs(i: int) -> None:
        done = await theirs.chat.completions.create(
            model=name, messages=messages(i), max_tokens=tokens, temperature=0.0, extra_body=extra
        )
        assert done.usage.completion_tokens == tokens

    await fire(send_ours, concurrency)  # warm both
    await fire(send_theirs, concurrency)
    times: dict[str, list[float]] = {"agentkit": [], "openai": []}
    for round_ in range(rounds):  # alternate who goes first: the server drifts over a run
        order = [("agentkit", send_ours), ("openai", send_theirs)]
        for who, send in order if round_ % 2 == 0 else order[::-1]:
            times[who].append(await fire(send, concurrency))
    await ours.aclose()
    await theirs.close()
    ours_tps = concurrency * tokens / statistics.median(times["agentkit"])
    theirs_tps = concurrency * tokens / statistics.median(times["openai"])
    return {
        "concurrency": concurrency,
        "completion_tokens_each": tokens,
        "rounds": rounds,
        "agentkit_tokens_per_s": ours_tps,
        "openai_tokens_per_s": theirs_tps,
        "ratio": ours_tps / theirs_tps,
        "target": "ratio >= 0.95",
        "met": ours_tps / theirs_tps >= 0.95,
        "seconds": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    settings = Settings()
    server = None
    url = os.environ.get("AGENTKIT_LLM_URL")
    if not url:
        server = ModelServer(
            ServeOptions(model=args.model, device=args.device, port=8123), settings.cache_dir
        )
        url = server.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            index_path = Path(tmp) / "index"
            index_folder(ROOT / "examples" / "sample-docs", index_path, settings=settings)
            result = {
                "device": args.device,
                "model": OpenAIChatModel(url).model,
                "overhead": overhead(url, index_path, args.rounds),
            }
        result["throughput"] = asyncio.run(
            throughput(url, args.concurrency, args.tokens, args.throughput_rounds)
        )
        write_result(f"llm_{args.device}", result)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
