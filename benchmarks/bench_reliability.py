"""Feedback store under concurrent traffic (issue 18): write latency, lost rows, whole exports.

1. Writes: 1,000 ratings at 1/8/16/64 concurrent threads; p50/p99 latency, throughput, rows
   stored. Directly against ``FeedbackStore`` (one process; and two processes sharing the file,
   half the threads each) and through the HTTP API (``create_app`` under uvicorn in a subprocess,
   loopback, each client a keep-alive connection driven by one event loop in the benchmark's
   process, so the client costs the 2 cores little).
2. Export under load: 16 writers add 4,000 rankings (one pair each) while another thread
   exports over and over. An export is complete when it holds at least the rows acknowledged
   before it began and at most the rows sent before it ended, and parses. Directly, the export is
   consumed the way the old API's ``StreamingResponse`` did: each item pulled on a pool thread.

Baseline in the same run: ``services/feedback.py`` as of ``--baseline`` (git), same workload,
each implementation in fresh processes on a fresh database, baseline first at each level. Through
the API the baseline store sits behind a shim that drops the ``owner`` argument; the API itself
is the working tree's. ``no_store`` runs the API with a store that stores nothing: the floor the
HTTP path sets under any store. Target (issue 18): p99 <= 200 ms at 64 concurrent on one process,
zero loss, every export complete.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

from common import ROOT, write_result

BASELINE = "556dbe3"  # the last commit before the single-writer store
LEVELS = (1, 8, 16, 64)
WRITES = 1000
EXPORT_WRITERS, EXPORT_ROWS = 16, 4000


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def load_store_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"feedback_{abs(hash(path))}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def rows_in(db: Path) -> int | None:
    import sqlite3

    if not db.exists():  # the API without a store
        return None
    with sqlite3.connect(db) as connection:
        return int(connection.execute("SELECT count(*) FROM feedback").fetchone()[0])


def summary(
    latencies_ms: list[float], errors: int, wall_s: float, rows: int | None
) -> dict[str, Any]:
    return {
        "mean_ms": round(statistics.fmean(latencies_ms), 3) if latencies_ms else None,
        "p50_ms": round(statistics.median(latencies_ms), 3) if latencies_ms else None,
        "p99_ms": round(percentile(latencies_ms, 0.99), 3) if latencies_ms else None,
        "max_ms": round(max(latencies_ms), 3) if latencies_ms else None,
        "writes_per_s": round(len(latencies_ms) / wall_s, 1),
        "acknowledged": len(latencies_ms),
        "errors": errors,
        "rows_stored": rows,
        "lost": None if rows is None else len(latencies_ms) - rows,
    }


# --- workers (subprocesses) -----------------------------------------------------------------------


def wait_all(running: list[Any], done: threading.Event) -> None:
    try:
        for future in running:
            future.result()
    finally:
        done.set()


def worker_direct(store_file: str, db: str, threads: int, writes: int) -> None:
    """Wait for "go" on stdin, write ``writes`` ratings from ``threads`` threads, print timings."""
    store = load_store_module(store_file).FeedbackStore(db)
    print("ready", flush=True)
    sys.stdin.readline()
    latencies: list[float] = []
    errors: list[str] = []

    def write(count: int, offset: int) -> None:
        for i in range(offset, offset + count):
            started = time.perf_counter()
            try:
                store.add_rating(f"p{i % 50}", f"c{i}", 1 if i % 2 else -1, "bench")
            except Exception as exc:  # noqa: BLE001  (counted: a lost write)
                errors.append(type(exc).__name__)
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    offsets = [sum(split(writes, threads)[:k]) for k in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, split(writes, threads), offsets))
    wall = time.perf_counter() - started
    print(
        json.dumps({"latencies_ms": latencies, "errors": len(errors), "wall_s": wall}), flush=True
    )


def worker_export_direct(store_file: str, db: str) -> None:
    """16 writers add rankings while this thread exports, pulling items on pool threads."""
    store = load_store_module(store_file).FeedbackStore(db)
    sent = acknowledged = 0
    lock = threading.Lock()
    done = threading.Event()

    def write(count: int, offset: int) -> None:
        nonlocal sent, acknowledged
        for i in range(offset, offset + count):
            with lock:
                sent += 1
            store.add_ranking(f"p{i}", [f"a{i}", f"b{i}"], "bench")
            with lock:
                acknowledged += 1

    exports = []
    pullers = [ThreadPoolExecutor(1) for _ in range(4)]
    with ThreadPoolExecutor(EXPORT_WRITERS) as writers:
        counts = split(EXPORT_ROWS, EXPORT_WRITERS)
        running = [writers.submit(write, c, sum(counts[:k])) for k, c in enumerate(counts)]
        threading.Thread(target=wait_all, args=(running, done)).start()
        while not done.is_set():
            with lock:
                lower = acknowledged
            items, pairs, error = iter(store.pairwise()), 0, None
            while True:
                try:  # a busy server's thread pool: each next() on whichever thread is free
                    puller = pullers[pairs % len(pullers)]
                    item = puller.submit(next, items, None).result()
                except Exception as exc:  # noqa: BLE001  (recorded: the export broke off)
                    error = f"{type(exc).__name__}: {exc}"[:200]
                    break
                if item is None:
                    break
                pairs += 1
            with lock:
                upper = sent
            exports.append({"pairs": pairs, "lower": lower, "upper": upper, "error": error})
    for puller in pullers:
        puller.shutdown()
    final = len(list(store.pairwise()))
    print(json.dumps({"exports": exports, "final": final}), flush=True)


class Ownerless:
    """The baseline store behind the current API, which passes ``owner``."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.path = store.path  # the web page's labeling tables live beside the feedback

    def add_rating(self, *args: Any, owner: str | None = None, **kwargs: Any) -> int:
        return self.store.add_rating(*args, **kwargs)

    def add_ranking(self, *args: Any, owner: str | None = None, **kwargs: Any) -> int:
        return self.store.add_ranking(*args, **kwargs)

    def pairwise(self, owner: str | None = None, **_: Any) -> Any:
        return self.store.pairwise()

    def count(self, owner: str | None = None) -> int:
        return self.store.count()


class NoStore:
    """Stores nothing: what the API costs by itself, the floor under any store."""

    def add_rating(self, *args: Any, **kwargs: Any) -> int:
        return 1

    add_ranking = add_rating

    def pairwise(self, owner: str | None = None, **_: Any) -> list[dict[str, str]]:
        return []


def worker_serve(store_file: str, db: str, port: int) -> None:
    import uvicorn

    from agentkit.services.api import create_app
    from agentkit.testing import ScriptedChatModel

    if store_file == "none":
        store: Any = NoStore()
        store.path = db  # the labeling tables need a database, even when feedback goes nowhere
    else:
        store = load_store_module(store_file).FeedbackStore(db)
        if "owner" not in inspect.signature(store.add_rating).parameters:
            store = Ownerless(store)
    app = create_app(ScriptedChatModel(["unused"]), None, feedback=store)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the runs -------------------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent,
    )


def run_direct(store_file: str, db: Path, threads: int, processes: int) -> dict[str, Any]:
    workers = [
        spawn("direct", store_file, str(db), str(t), str(w))
        for t, w in zip(split(threads, processes), split(WRITES, processes))
    ]
    for worker in workers:
        assert worker.stdout and worker.stdout.readline().strip() == "ready"
    for worker in workers:
        assert worker.stdin
        worker.stdin.write("go\n")
        worker.stdin.flush()
    outputs = [json.loads(w.communicate()[0]) for w in workers]
    wall = max(o["wall_s"] for o in outputs)  # from "go" to the last write, not process exit
    latencies = [x for o in outputs for x in o["latencies_ms"]]
    return summary(latencies, sum(o["errors"] for o in outputs), wall, rows_in(db))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, store_file: str, db: Path) -> None:
        import httpx

        self.db, port = db, free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = spawn("serve", store_file, str(db), str(port))
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the API did not start") from None
                time.sleep(0.1)  # polling a starting server: nothing to wait on instead

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON: a client that costs the machine far
    less than the server it measures (threads of httpx clients, or httpx's asyncio pool, would
    take the server's cores and time their own waits as its latency)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def post(self, path: str, body: dict[str, Any]) -> int:
        """The response's status (its body is read and dropped)."""
        data = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await self.writer.drain()
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next(int(h.split(":")[1]) for h in head if h.lower().startswith("content-length"))
        await self.reader.readexactly(length)
        return int(head[0].split()[1])

    def close(self) -> None:
        self.writer.close()


def run_http(store_file: str, db: Path, threads: int) -> dict[str, Any]:
    """``threads`` concurrent clients, each a keep-alive connection, as tasks on one event
    loop in the benchmark's process."""
    server = Server(store_file, db)
    latencies: list[float] = []
    errors: list[str] = []

    async def write(connection: Connection, count: int, offset: int) -> None:
        for i in range(offset, offset + count):
            body = {"prompt": f"p{i % 50}", "completion": f"c{i}", "labeler": "bench"}
            body["rating"] = 1 if i % 2 else -1  # type: ignore[assignment]
            started = time.perf_counter()
            try:
                status = await connection.post("/v1/feedback", body)
            except (OSError, asyncio.IncompleteReadError) as exc:
                errors.append(type(exc).__name__)
                return
            if status != 200:
                errors.append(str(status))
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    async def clients() -> float:
        # every client connects before the clock starts
        connections = await asyncio.gather(*(Connection.open(server.url) for _ in range(threads)))
        counts = split(WRITES, threads)
        started = time.perf_counter()
        await asyncio.gather(
            *(write(c, n, sum(counts[:k])) for k, (c, n) in enumerate(zip(connections, counts)))
        )
        wall = time.perf_counter() - started
        for connection in connections:
            connection.close()
        return wall

    try:
        wall = asyncio.run(clients())
    finally:
        server.stop()
    result = summary(latencies, len(errors), wall, rows_in(db))
    result["error_kinds"] = sorted(set(errors))
    return result


def run_export_http(store_file: str, db: Path) -> dict[str, Any]:
    import httpx

    server = Server(store_file, db)
    sent = acknowledged = 0
    lock = threading.Lock()
    done = threading.Event()

    def write(count: int, offset: int) -> None:
        nonlocal sent, acknowledged
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for i in range(offset, offset + count):
                body = {"prompt": f"p{i}", "ranking": [f"a{i}", f"b{i}"], "labeler": "bench"}
                with lock:
                    sent += 1
                if client.post("/v1/feedback", json=body).status_code == 200:
                    with lock:
                        acknowledged += 1

    exports = []
    try:
        with ThreadPoolExecutor(EXPORT_WRITERS + 1) as pool, httpx.Client(timeout=120) as exporter:
            counts = split(EXPORT_ROWS, EXPORT_WRITERS)
            running = [pool.submit(write, c, sum(counts[:k])) for k, c in enumerate(counts)]
            pool.submit(wait_all, running, done)
            while not done.is_set():
                with lock:
                    lower = acknowledged
                response = exporter.get(server.url + "/v1/feedback/export?format=pairwise")
                with lock:
                    upper = sent
                lines, error = response.text.splitlines(), None
                try:
                    for line in lines:
                        json.loads(line)
                except ValueError as exc:
                    error = f"unparsable line: {exc}"[:200]
                exports.append(
                    {
                        "status": response.status_code,
                        "pairs": len(lines),
                        "lower": lower,
                        "upper": upper,
                        "error": error,
                    }
                )
            final = httpx.get(server.url + "/v1/feedback/export?format=pairwise").text
    finally:
        server.stop()
    return judge_exports(exports, len(final.splitlines()), rows_in(db))


def judge_exports(exports: list[dict[str, Any]], final: int, rows: int | None) -> dict[str, Any]:
    complete = [
        e["error"] is None
        and e.get("status", 200) == 200
        and e["lower"] <= e["pairs"] <= e["upper"]
        for e in exports
    ]
    short = [e for e, ok in zip(exports, complete) if not ok]
    return {
        "exports": len(exports),
        "complete": sum(complete),
        "incomplete_examples": short[:5],
        "final_export_pairs": final,
        "rows_stored": rows,
        "final_complete": final == rows,
    }


def run_export_direct(store_file: str, db: Path) -> dict[str, Any]:
    worker = spawn("export-direct", store_file, str(db))
    output = json.loads(worker.communicate()[0])
    return judge_exports(output["exports"], output["final"], rows_in(db))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline store")
    parser.add_argument("--no-baseline", action="store_true", help="measure the working tree only")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        {
            "direct": lambda: worker_direct(rest[0], rest[1], int(rest[2]), int(rest[3])),
            "export-direct": lambda: worker_export_direct(rest[0], rest[1]),
            "serve": lambda: worker_serve(rest[0], rest[1], int(rest[2])),
        }[kind]()
        return

    began = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    stores = {"current": str(ROOT / "services" / "feedback.py")}
    if not args.no_baseline:
        old = subprocess.run(
            ["git", "show", f"{args.baseline}:services/feedback.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (scratch / "baseline_feedback.py").write_text(old)
        stores = {"baseline": str(scratch / "baseline_feedback.py"), **stores}
    runs = 0

    def fresh_db() -> Path:
        nonlocal runs
        runs += 1
        return scratch / f"run{runs}.sqlite"

    results: dict[str, dict[str, Any]] = {name: {} for name in stores}
    for threads in LEVELS:
        for name, store_file in stores.items():
            results[name][f"direct_{threads}"] = run_direct(store_file, fresh_db(), threads, 1)
            print(name, "direct", threads, results[name][f"direct_{threads}"], file=sys.stderr)
    for name, store_file in stores.items():
        results[name]["direct_64_two_processes"] = run_direct(store_file, fresh_db(), 64, 2)
    for threads in LEVELS:
        for name, store_file in stores.items():
            results[name][f"http_{threads}"] = run_http(store_file, fresh_db(), threads)
            print(name, "http", threads, results[name][f"http_{threads}"], file=sys.stderr)
    results["no_store"] = {f"http_{t}": run_http("none", fresh_db(), t) for t in (1, 64)}
    for name, store_file in stores.items():
        results[name]["export_direct_16_writers"] = run_export_direct(store_file, fresh_db())
        results[name]["export_http_16_writers"] = run_export_http(store_file, fresh_db())

    current = results["current"]
    ratios = {}
    if "baseline" in results:
        for key, value in current.items():
            old = results["baseline"][key]
            if "p99_ms" in value and value["p99_ms"] and old["p99_ms"]:
                ratios[key] = {
                    "mean_speedup": round(old["mean_ms"] / value["mean_ms"], 2),
                    "p99_speedup": round(old["p99_ms"] / value["p99_ms"], 2),
                    "max_speedup": round(old["max_ms"] / value["max_ms"], 2),
                    "throughput_ratio": round(value["writes_per_s"] / old["writes_per_s"], 2),
                }
    met = {
        "direct_64_p99_le_200ms": current["direct_64"]["p99_ms"] <= 200,
        "http_64_p99_le_200ms": current["http_64"]["p99_ms"] <= 200,
        "no_lost_writes": all(
            v.get("lost", 0) == 0 and v.get("errors", 0) == 0 for v in current.values()
        ),
        "every_export_complete": all(
            current[k]["complete"] == current[k]["exports"] and current[k]["final_complete"]
            for k in ("export_direct_16_writers", "export_http_16_writers")
        ),
    }
    write_result(
        "reliability",
        {
            "writes_per_level": WRITES,
            "levels": list(LEVELS),
            "baseline": None if args.no_baseline else args.baseline,
            "sqlite": __import__("sqlite3").sqlite_version,
            "results": results,
            "ratios_current_vs_baseline": ratios,
            "target": "p99 <= 200 ms at 64 concurrent (direct and HTTP, one process), "
            "no lost writes, every export complete",
            "met": met,
            "seconds": round(time.perf_counter() - began, 1),
        },
    )


if __name__ == "__main__":
    main()
