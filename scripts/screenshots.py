"""Screenshots of the web page for the README: the chat with citations, the labeling view.

Serves the API over examples/sample-docs with a scripted model (no model server needed) and
takes the pictures in Debian's Chromium with Playwright:

    .venv/bin/python scripts/screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from agentkit import Index, index_folder
from agentkit.services.api import ApiConfig, create_app
from agentkit.services.conversations import ConversationStore
from agentkit.services.feedback import FeedbackStore
from agentkit.services.labeling import LabelingStore
from agentkit.settings import Settings
from agentkit.testing import HashingEmbedder, ScriptedChatModel

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Where does the index live, and what is in it?"
ANSWER = (
    "The index lives in `./.agentkit/index` unless `AGENTKIT_INDEX` or `--index` names another "
    "folder [1]. It holds `index.sqlite`, `vectors.faiss` and `manifest.json` [1]; re-running "
    "`agentkit index` only re-embeds the files that changed [2]."
)
COMPLETIONS = [
    "In `./.agentkit/index`, or the folder `AGENTKIT_INDEX` names [1].",
    "The index is kept in **.agentkit/index** by default; set `AGENTKIT_INDEX` or pass "
    "`--index` to use another folder [1].",
    "It lives in the cache folder, `~/.cache/agentkit`.",
    "In `index.sqlite`, `vectors.faiss` and `manifest.json` [1].",
]


def reply(messages: list[dict[str, str]], **options: object) -> str:
    return ANSWER if "Sources:" in messages[-1]["content"] else "Hello."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="agentkit-screenshots-"))
    settings = Settings(index=tmp / "index", cache_dir=tmp / "cache", rag_min_similarity=0.0)
    embedder = HashingEmbedder()
    shutil.copytree(ROOT / "examples" / "sample-docs", tmp / "docs")
    index_folder(tmp / "docs", settings.index, settings=settings, embedder=embedder)
    index = Index.open(settings.index, settings=settings, embedder=embedder)
    feedback = FeedbackStore(tmp / "feedback.sqlite")
    labeling = LabelingStore(feedback)
    task = labeling.create_task(
        [QUESTION, "Which file formats does the indexer read?"],
        agent="agentkit-rag",
        n=4,
        labelers_per_prompt=2,
        name="Index questions",
    )
    for item_id, _ in labeling.pending(task["id"]):
        labeling.set_completions(item_id, COMPLETIONS)
    app = create_app(
        ScriptedChatModel(reply),
        index,
        feedback=feedback,
        conversations=ConversationStore(tmp / "conversations.sqlite"),
        config=ApiConfig(),
        settings=settings,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
            page = browser.new_page(viewport={"width": 1200, "height": 640})
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]")
            page.fill("#labeler", "ann")
            page.fill("#prompt", QUESTION)
            page.keyboard.press("Enter")
            page.wait_for_selector(".answer[data-status=done]")
            page.locator(".answer button.cite").first.click()
            page.locator(".answer button.thumb.up").click()
            page.wait_for_selector("text=Thanks, saved.")
            page.locator("#prompt").blur()
            page.screenshot(path=out / "web-chat.png")
            page.goto(url + "#label")
            page.click("table.tasks button:text-is('Label')")
            page.wait_for_selector("#workbench .prompt")
            for key in ("2", "=", "1"):
                page.keyboard.press(key)
            page.screenshot(path=out / "web-labeling.png")
            browser.close()
    finally:
        server.should_exit = True
    for name in ("web-chat.png", "web-labeling.png"):
        print(out / name, (out / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
