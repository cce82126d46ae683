"""The web page in Chromium against `agentkit serve`'s API with the scripted model (issue 13).

1. From the server's first SSE byte of an answer to its first token painted in the page, p50 over
   20 answers (target ≤ 50 ms). The server's side is the time its first body bytes of
   ``/v1/chat/completions`` go to the socket (an ASGI layer around the app); the page's is the
   ``agentkit:first-paint`` performance mark, set in the animation-frame callback that puts the
   first token in the DOM (the frame it is painted in). Both are wall-clock times on one machine.
   The page-only span (the first network chunk read → painted) is reported beside it.
2. Keystrokes to rank a prompt of 4 completions (target ≤ 6): keys 1, 2, 3 and Enter (the last
   place is implied); with one tie (=) one more. Each ranking is checked in the store.
3. Page weight (HTML + JS + CSS + icon, uncompressed) and the requests of a cold load (a new
   browser context), split into the page's files and API calls.

    ../.venv/bin/python bench_web.py
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, write_result

sys.path.insert(0, str(ROOT / "tests"))

from web_support import chromium_path, start  # noqa: E402

from agentkit.services.labeling import LabelingStore  # noqa: E402
from agentkit.services.web import PageAssets  # noqa: E402

ANSWERS = 20


class FirstByte:
    """ASGI layer: when the first body bytes of each chat response were sent (time.time())."""

    def __init__(self, app: Any) -> None:
        self.app, self.sent = app, []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        first = True

        async def timed(message: Any) -> None:
            nonlocal first
            await send(message)
            if first and message["type"] == "http.response.body" and message.get("body"):
                self.sent.append(time.time())
                first = False

        await self.app(scope, receive, timed)


def marks(page: Any, name: str) -> list[float]:
    """Wall-clock times (s) of the page's performance marks called ``name``."""
    return page.evaluate(
        "name => performance.getEntriesByName(name).map(m => (performance.timeOrigin + "
        "m.startTime) / 1000)",
        name,
    )


def first_token_latency(browser: Any, served: Any, timer: FirstByte) -> dict[str, Any]:
    page = browser.new_page()
    page.goto(served.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.select_option("#agent", "scripted")
    for i in range(ANSWERS):
        page.fill("#prompt", f"answer number {i} with a few words to stream")
        page.keyboard.press("Enter")
        page.wait_for_selector(f".answer[data-status=done] >> nth={i}")
    painted, read = marks(page, "agentkit:first-paint"), marks(page, "agentkit:first-byte")
    page.close()
    assert len(painted) == len(read) == len(timer.sent) == ANSWERS
    server_to_paint = [(p - s) * 1000 for p, s in zip(painted, timer.sent)]
    read_to_paint = [(p - r) * 1000 for p, r in zip(painted, read)]
    return {
        "answers": ANSWERS,
        "server_first_byte_to_paint_ms": summary(server_to_paint),
        "page_first_chunk_to_paint_ms": summary(read_to_paint),
        "target_p50_ms": 50,
    }


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 2),
        "max": round(ordered[-1], 2),
    }


def keystrokes_to_rank(browser: Any, served: Any) -> dict[str, Any]:
    store = LabelingStore(served.feedback)
    task = store.create_task(["plain", "with a tie"], agent="scripted", n=4)
    for item_id, prompt in store.pending(task["id"]):
        store.set_completions(item_id, [f"{prompt}: completion {i}" for i in range(4)])
    page = browser.new_page()
    page.goto(served.url + "/#label")
    page.wait_for_selector("body[data-ready=true]")
    page.fill("#labeler", "bench")
    page.click("table.tasks button:text-is('Label')")
    counts = {}
    sequences = {"no_ties": ["1", "2", "3", "Enter"], "one_tie": ["1", "=", "2", "3", "Enter"]}
    for name, keys in sequences.items():
        page.wait_for_selector("#workbench .prompt")
        before = page.locator("#workbench .progress").inner_text()
        for key in keys:
            page.keyboard.press(key)
        page.locator("#workbench .progress").filter(has_not_text=before).wait_for()
        counts[name] = len(keys)
    page.close()
    stored = sqlite3.connect(served.feedback.path).execute(
        "SELECT ranking, ties FROM labeling_rankings ORDER BY id"
    )
    rankings = [(len(json.loads(r)), len(json.loads(t))) for r, t in stored]
    store.close()
    assert rankings == [(4, 0), (4, 1)], rankings
    return {"completions": 4, "keystrokes": counts, "target": 6}


def cold_load(browser: Any, served: Any) -> dict[str, Any]:
    context = browser.new_context()
    page = context.new_page()
    requests: list[tuple[str, str]] = []
    sizes: dict[str, int] = {}
    page.on("request", lambda r: requests.append((r.url, r.resource_type)))

    def size(response: Any) -> None:
        try:
            sizes[response.url] = len(response.body())
        except Exception:  # a response without a body
            sizes[response.url] = 0

    page.on("response", size)
    started = time.perf_counter()
    page.goto(served.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    ready_ms = (time.perf_counter() - started) * 1000
    page.wait_for_load_state("networkidle")
    context.close()
    api = [u for u, _ in requests if "/v1/" in u]
    files = [u for u, _ in requests if "/v1/" not in u]
    assets = PageAssets()
    return {
        "page_weight_bytes": assets.weight,
        "page_weight_limit_bytes": 150_000,
        "files": {name: len(content) for name, content in assets.files.items()},
        "cold_load_requests": len(requests),
        "cold_load_file_requests": len(files),
        "cold_load_api_requests": len(api),
        "cold_load_api_paths": sorted({u.split(served.url)[1].split("?")[0] for u in api}),
        "cold_load_bytes_received": sum(sizes.values()),
        "cold_load_to_ready_ms": round(ready_ms, 1),
        "other_origins": sorted({u for u, _ in requests if not u.startswith(served.url)}),
    }


def main() -> None:
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if path is None:
        sys.exit("no Chromium: install Debian's chromium package (scripts/setup.sh does, as root)")
    timer: FirstByte | None = None

    def wrap(app: Any) -> Any:
        nonlocal timer
        timer = FirstByte(app)
        return timer

    served = start(Path(tempfile.mkdtemp(prefix="agentkit-bench-web-")), wrap=wrap)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=path)
            result = {
                "chromium": browser.version,
                "first_token": first_token_latency(browser, served, timer),  # type: ignore[arg-type]
                "ranking": keystrokes_to_rank(browser, served),
                "load": cold_load(browser, served),
            }
            browser.close()
    finally:
        served.stop()
    write_result("web", result)


if __name__ == "__main__":
    main()
