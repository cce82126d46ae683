"""Throughput of the REST API as clients are added, and /healthz while it is loaded.

Issues 12 and 18: searches from concurrent requests must not be serialised (8 concurrent
``/v1/search`` clients vs 1), chat throughput must rise with clients until the CPUs are busy,
and ``/healthz`` must stay under 50 ms meanwhile. The baseline is the same server with one
client, in the same run.

Corpus: the HotpotQA paragraphs of ../shared/data (one document per title), indexed with the
real embedding model. ``agentkit serve`` runs as a subprocess; the model is a local fake
OpenAI-compatible server (another subprocess) that answers at once, so the figures are
agentkit's own cost (retrieval, prompt assembly, HTTP). Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, SHARED, write_result

SECONDS_PER_LEVEL = 8.0
QUESTIONS = [
    "Which magazine was started first?",
    "Who directed the film about the raid?",
    "What government position was held by the woman who portrayed Corliss Archer?",
    "Where was the leader of the raid from?",
]


def fake_llm(port: int) -> None:
    """An OpenAI-compatible model that answers every chat at once, citing source 1."""
    answer = json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "model": "fake",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "See [1]."},
                 "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 3},
        }
    ).encode()  # fmt: skip
    models = json.dumps({"data": [{"id": "fake", "max_model_len": 4096}]}).encode()

    class Handle(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            self.reply(models)

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if self.path == "/tokenize":
                count = sum(len(m["content"]) // 4 for m in body.get("messages", []))
                self.reply(json.dumps({"count": count}).encode())
            else:
                self.reply(answer)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handle).serve_forever()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_corpus(folder: Path) -> int:
    seen = set()
    with open(SHARED / "data" / "hotpotqa" / "dev_100.jsonl") as lines:
        for line in lines:
            for title, sentences in json.loads(line)["context"]:
                name = "".join(c if c.isalnum() else "_" for c in title)[:80] + ".txt"
                if name not in seen:
                    seen.add(name)
                    (folder / name).write_text(f"{title}\n\n{' '.join(sentences)}\n")
    return len(seen)


def wait_ready(url: str, process: subprocess.Popen, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def load(url: str, clients: int, kind: str) -> dict[str, float]:
    """``clients`` threads sending ``kind`` requests for SECONDS_PER_LEVEL; /healthz probed."""
    stop = threading.Event()
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            n = i
            while not stop.is_set():
                question = QUESTIONS[n % len(QUESTIONS)]
                n += 1
                started = time.perf_counter()
                if kind == "search":
                    response = http.post("/v1/search", json={"query": question, "k": 5})
                else:
                    response = http.post(
                        "/v1/chat/completions",
                        json={"model": "agentkit-rag",
                              "messages": [{"role": "user", "content": question}]},
                    )  # fmt: skip
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        failures[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    # The probe runs in a process of its own, as a load balancer's would: in this one it would
    # wait for the GIL behind the clients' threads and time them, not the server.
    probe_end, probe_results = multiprocessing.Pipe()
    probe = multiprocessing.get_context("spawn").Process(
        target=prober, args=(url, SECONDS_PER_LEVEL, probe_end)
    )
    probe.start()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(SECONDS_PER_LEVEL)  # the measurement window (a load test, not a synchronisation)
    stop.set()
    for thread in threads:
        thread.join()
    health = probe_results.recv()
    probe.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": failures[0],
        "per_s": len(latencies) / wall,
        "p50_ms": statistics.median(ordered) * 1000 if ordered else 0.0,
        "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1000 if ordered else 0.0,
        "healthz_p50_ms": statistics.median(health) if health else 0.0,
        "healthz_p99_ms": sorted(health)[int(0.99 * (len(health) - 1))] if health else 0.0,
        "healthz_max_ms": max(health) if health else 0.0,
    }


def prober(url: str, seconds: float, results: Any) -> None:
    """/healthz every 100 ms for ``seconds``; the latencies (ms) are sent to ``results``."""
    health: list[float] = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            http.get("/healthz")
            health.append((time.perf_counter() - started) * 1000)
            time.sleep(0.1)
    results.send(health)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fake-llm", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_llm:
        fake_llm(args.fake_llm)
        return
    work = Path(tempfile.mkdtemp(prefix="agentkit-bench-api-"))
    (work / "docs").mkdir()
    documents = build_corpus(work / "docs")
    agentkit = str(Path(sys.executable).with_name("agentkit"))
    subprocess.run(
        [agentkit, "index", str(work / "docs"), "--index", str(work / "index"), "--json"],
        check=True, capture_output=True,
    )  # fmt: skip
    llm_port, api_port = free_port(), free_port()
    llm = subprocess.Popen([sys.executable, __file__, "--fake-llm", str(llm_port)])
    env = {**os.environ, "AGENTKIT_API_RATE_LIMIT_PER_MINUTE": "0",
           "AGENTKIT_FEEDBACK_DB": str(work / "feedback.sqlite"),
           "AGENTKIT_CONVERSATIONS_DB": str(work / "conversations.sqlite")}  # fmt: skip
    api = subprocess.Popen(
        [agentkit, "serve", "--index", str(work / "index"), "--port", str(api_port),
         "--llm-url", f"http://127.0.0.1:{llm_port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work,
    )  # fmt: skip
    url = f"http://127.0.0.1:{api_port}"
    try:
        wait_ready(url, api)
        load(url, 2, "search")  # warm-up: the embedder's sessions, SQLite caches
        search = {n: load(url, n, "search") for n in (1, 8)}
        chat = {n: load(url, n, "chat") for n in (1, 8, 32)}
    finally:
        for process in (api, llm):
            process.terminate()
            process.wait(timeout=30)
    healthz_max = max(r["healthz_max_ms"] for r in [*search.values(), *chat.values()])
    result = {
        "corpus_documents": documents,
        "seconds_per_level": SECONDS_PER_LEVEL,
        "search": search,
        "chat_rag": chat,
        "search_throughput_8_vs_1": search[8]["per_s"] / search[1]["per_s"],
        "chat_throughput_8_vs_1": chat[8]["per_s"] / chat[1]["per_s"],
        "chat_throughput_32_vs_1": chat[32]["per_s"] / chat[1]["per_s"],
        "healthz_max_ms": healthz_max,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "target": "throughput rises with clients (ratio > 1 on 2 cores); /healthz < 50 ms",
    }
    result["met"] = result["search_throughput_8_vs_1"] > 1 and healthz_max < 50
    write_result("api_concurrency", result)


if __name__ == "__main__":
    main()
