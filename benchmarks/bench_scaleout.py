"""The API as replicas and workers on one PostgreSQL, against the embedded default (issue 16).

Two configurations in the same run:

- ``postgresql_2x2``: two replicas (``agentkit serve --workers 2`` on two ports) on one
  PostgreSQL server (started here: initdb + pg_ctl in a temporary folder on loopback);
- ``sqlite_1x1``: one ``agentkit serve`` process on the SQLite files (the embedded default),
  the baseline.

Each gets the same load: 2,000 feedback writes (rankings of 2 or 3 completions) from 64
concurrent clients spread over the replicas, then the pairwise export is checked to hold
exactly the expected pairs and the database exactly the expected rows; then 400 chat
completions (half streamed, each in a conversation of its own, so the history is read and
written) from 32 concurrent clients. The model is a fake OpenAI-compatible server in its own
process that answers at once, so the figures are agentkit's own cost (HTTP, keys, the
database). Requests use keys kept in the database (``agentkit keys add``). Loopback only;
every process (servers, PostgreSQL, the fake model, the clients) shares this machine's CPUs,
so the absolute numbers are those of a small box, and the ratio between the two configurations
is the comparison.

    flock /tmp/agentkit-heavy.lock .venv/bin/python benchmarks/bench_scaleout.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, write_result

sys.path.insert(0, str(ROOT / "tests"))
from pg_support import free_port, running_postgres  # noqa: E402

from agentkit.services.keys import KeyStore  # noqa: E402
from agentkit.services.storage import open_database  # noqa: E402

FEEDBACK_WRITES = 2000
FEEDBACK_CLIENTS = 64
CHATS = 400
CHAT_CLIENTS = 32
USERS = 4
SERVE = "from agentkit.cli import app; app()"


def fake_model(port: int) -> None:
    """An OpenAI-compatible model that answers every request at once (chat, streamed chat,
    tokenize, models)."""
    completion = json.dumps(
        {"id": "x", "object": "chat.completion", "model": "fake",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."},
                      "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 20, "completion_tokens": 3}}
    ).encode()  # fmt: skip
    pieces = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
              for p in ("Hello", " there", ".")]  # fmt: skip
    pieces.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    pieces.append({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 3}})
    stream = ("".join(f"data: {json.dumps(p)}\n\n" for p in pieces) + "data: [DONE]\n\n").encode()
    models = json.dumps({"data": [{"id": "fake", "max_model_len": 4096}]}).encode()

    class Handle(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, body: bytes, kind: str = "application/json") -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            self.reply(models)

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path.endswith("/tokenize"):
                self.reply(b'{"count": 20}')
            elif body.get("stream"):
                self.reply(stream, "text/event-stream")
            else:
                self.reply(completion)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 256
    ThreadingHTTPServer(("127.0.0.1", port), Handle).serve_forever()


@contextmanager
def process(command: list[str], environment: dict[str, str], ready: str, count: int) -> Iterator:
    """``command`` running until the block ends, once ``ready`` was logged ``count`` times."""
    child = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    try:
        assert child.stderr is not None
        seen = 0
        for line in child.stderr:
            log.append(line)
            seen += ready in line
            if seen == count:
                break
        if seen < count:
            raise RuntimeError("did not start:\n" + "".join(log[-40:]))
        threading.Thread(target=lambda: log.extend(child.stderr), daemon=True).start()  # type: ignore[arg-type]
        yield log
    finally:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99),
            "max_ms": round(1000 * ordered[-1], 2),
            "mean_ms": round(1000 * statistics.fmean(ordered), 2)}  # fmt: skip


async def load(
    urls: list[str], requests: list[tuple[str, str, dict[str, Any], str]], clients: int
) -> dict[str, Any]:
    """Send ``requests`` ((path, key, body, kind)) from ``clients`` concurrent clients, each on
    a connection of its own, spread over ``urls`` in turn; latencies by kind, failures."""
    latencies: dict[str, list[float]] = {}
    failures: list[str] = []
    replies: list[dict[str, Any]] = []
    queue: asyncio.Queue[tuple[int, tuple[str, str, dict[str, Any], str]]] = asyncio.Queue()
    for item in enumerate(requests):
        queue.put_nowait(item)

    async def client(number: int) -> None:
        base = urls[number % len(urls)]
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            while not queue.empty():
                _, (path, key, body, kind) = queue.get_nowait()
                headers = {"Authorization": f"Bearer {key}"}
                began = time.perf_counter()
                try:
                    if body.get("stream"):
                        async with http.stream("POST", path, json=body, headers=headers) as reply:
                            text = "".join([piece async for piece in reply.aiter_text()])
                        ok = reply.status_code == 200 and "[DONE]" in text and '"error"' not in text
                    else:
                        reply = await http.post(path, json=body, headers=headers)
                        ok = reply.status_code == 200
                        if ok:
                            replies.append(reply.json())
                except httpx.HTTPError as error:
                    ok, reply = False, None  # type: ignore[assignment]
                    failures.append(f"{kind}: {type(error).__name__}: {error}")
                latencies.setdefault(kind, []).append(time.perf_counter() - began)
                if not ok and reply is not None:
                    failures.append(f"{kind}: HTTP {reply.status_code}")

    began = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    wall = time.perf_counter() - began
    every = [x for values in latencies.values() for x in values]
    return {
        "requests": len(requests),
        "clients": clients,
        "failures": len(failures),
        "failure_examples": failures[:5],
        "wall_s": round(wall, 3),
        "per_s": round(len(requests) / wall, 1),
        "latency": percentiles(every),
        "latency_by_kind": {kind: percentiles(values) for kind, values in latencies.items()},
        "_replies": replies,
    }


def run_configuration(
    name: str, replicas: int, workers: int, database_url: str | None, model_url: str, scratch: Path
) -> dict[str, Any]:
    folder = scratch / name
    folder.mkdir()
    environment = {
        **os.environ,
        "AGENTKIT_LLM_URL": model_url,
        "AGENTKIT_INDEX": str(folder / "no-index"),
        "AGENTKIT_FEEDBACK_DB": str(folder / "feedback.sqlite"),
        "AGENTKIT_CONVERSATIONS_DB": str(folder / "conversations.sqlite"),
        "AGENTKIT_STATE_DB": str(folder / "state.sqlite"),
        "AGENTKIT_API_RATE_LIMIT_PER_MINUTE": "0",
    }
    environment.pop("AGENTKIT_API_KEYS", None)
    if database_url:
        environment["AGENTKIT_DATABASE_URL"] = database_url
    location = database_url or str(folder / "state.sqlite")
    with open_database(location) as database:
        keys = KeyStore(database)
        users = [keys.add(f"user{i}", "user") for i in range(USERS)]
        admin = keys.add("admin", "admin")
    ports = [free_port() for _ in range(replicas)]
    with ExitStack() as stack:
        for port in ports:
            command = [sys.executable, "-c", SERVE, "serve", "--port", str(port),
                       "--workers", str(workers)]  # fmt: skip
            stack.enter_context(
                process(command, environment, "Application startup complete", workers)
            )
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        feedback_requests = []
        expected_pairs = 0
        for i in range(FEEDBACK_WRITES):
            ranking = [f"c{i}-a", f"c{i}-b", f"c{i}-c"][: 2 + i % 2]
            expected_pairs += len(ranking) * (len(ranking) - 1) // 2
            body = {"prompt": f"prompt {i}", "ranking": ranking, "labeler": "bench"}
            feedback_requests.append(("/v1/feedback", users[i % USERS], body, "feedback"))
        feedback = asyncio.run(load(urls, feedback_requests, FEEDBACK_CLIENTS))
        ids = [reply["id"] for reply in feedback.pop("_replies")]
        began = time.perf_counter()
        export = httpx.get(f"{urls[-1]}/v1/feedback/export",
                           headers={"Authorization": f"Bearer {admin}"}, timeout=120)  # fmt: skip
        export_s = time.perf_counter() - began
        pairs = [json.loads(line) for line in export.text.splitlines()]
        with open_database(location if database_url else str(folder / "feedback.sqlite")) as db:
            with db.read() as connection:
                rows = connection.execute("SELECT count(*) FROM feedback").fetchone()[0]
        feedback.update(
            rows=rows,
            rows_expected=FEEDBACK_WRITES,
            distinct_ids=len(set(ids)),
            export_pairs=len(pairs),
            export_pairs_expected=expected_pairs,
            export_exact=len(pairs) == expected_pairs
            and len({(p["prompt"], p["chosen"], p["rejected"]) for p in pairs}) == expected_pairs,
            export_s=round(export_s, 3),
        )
        chat_requests = []
        for i in range(CHATS):
            body = {"model": "fake", "max_tokens": 16, "stream": i % 2 == 1,
                    "messages": [{"role": "user", "content": f"Question {i}?"}],
                    "conversation_id": f"{name}-c{i}"}  # fmt: skip
            kind = "chat_stream" if body["stream"] else "chat"
            chat_requests.append(("/v1/chat/completions", users[i % USERS], body, kind))
        chat = asyncio.run(load(urls, chat_requests, CHAT_CLIENTS))
        chat.pop("_replies")
    return {
        "replicas": replicas,
        "workers_per_replica": workers,
        "database": "postgresql" if database_url else "sqlite",
        "feedback": feedback,
        "chat": chat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fake-model", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a tenth of the load, no result file")
    args = parser.parse_args()
    if args.fake_model:
        fake_model(args.fake_model)
        return
    global FEEDBACK_WRITES, CHATS
    if args.quick:
        FEEDBACK_WRITES, CHATS = FEEDBACK_WRITES // 10, CHATS // 10
    began = time.time()
    model_port = free_port()
    model = subprocess.Popen([sys.executable, __file__, "--fake-model", str(model_port)])
    results: dict[str, Any] = {}
    try:
        model_url = f"http://127.0.0.1:{model_port}/v1"
        for _ in range(100):  # the fake model listens within a second
            try:
                httpx.get(f"{model_url}/models", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as scratch:
            with running_postgres() as server:
                results["postgresql_2x2"] = run_configuration(
                    "postgresql_2x2", 2, 2, server, model_url, Path(scratch)
                )
                print(json.dumps(results["postgresql_2x2"], indent=1), file=sys.stderr)
            results["sqlite_1x1"] = run_configuration(
                "sqlite_1x1", 1, 1, None, model_url, Path(scratch)
            )
            print(json.dumps(results["sqlite_1x1"], indent=1), file=sys.stderr)
    finally:
        model.terminate()
    pg, lite = results["postgresql_2x2"], results["sqlite_1x1"]
    results["ratios_postgresql_2x2_over_sqlite_1x1"] = {
        "feedback_per_s": round(pg["feedback"]["per_s"] / lite["feedback"]["per_s"], 2),
        "chat_per_s": round(pg["chat"]["per_s"] / lite["chat"]["per_s"], 2),
        "chat_p50": round(pg["chat"]["latency"]["p50_ms"] / lite["chat"]["latency"]["p50_ms"], 2),
        "chat_p99": round(pg["chat"]["latency"]["p99_ms"] / lite["chat"]["latency"]["p99_ms"], 2),
    }
    results["seconds"] = round(time.time() - began, 1)
    if args.quick:
        print(json.dumps(results["ratios_postgresql_2x2_over_sqlite_1x1"]))
        return
    print(write_result("scaleout", results))


if __name__ == "__main__":
    main()
