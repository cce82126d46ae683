"""What the web page's tests share: the API with a scripted model served by uvicorn on
127.0.0.1, and Chromium driven by Playwright (tests skip, saying why, without either).

Test modules import the fixtures: ``from web_support import browser, page, served  # noqa``.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fakes import HashingEmbedder

from agentkit import Index, index_folder
from agentkit.services.api import ApiConfig, create_app
from agentkit.services.conversations import ConversationStore
from agentkit.services.feedback import FeedbackStore
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel
from agentkit.tools.sandbox import SandboxResult

XSS_DOC = (
    "# Hostile notes\n\nThe pangolin module renders <img src=x onerror=alert(1)> badges.\n"
    "Click [here](javascript:alert(2)) for the pangolin manual.\n"
)
PROGRAM = (
    "```python\ndef solution():\n    # 6 boxes of 7 pens\n    boxes = 6\n"
    "    print('boxes', boxes)\n    return boxes * 7\n```"
)


def text_of(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


def scripted_reply(messages: list[dict[str, str]], **options: Any) -> str:
    """The fake model: RAG, PAL and ReAct prompts get replies of their shape, with hostile
    text on request; anything else is echoed, word by word when streamed."""
    everything, last = text_of(messages), messages[-1]["content"]
    if "Sources:" in last:  # RAG
        if "pangolin" in last.lower() and "xss" in last.lower():
            return (
                "Beware <script>window.__xss = 1; alert(3)</script> and "
                "[click](javascript:alert(4)) <img src=x onerror=alert(5)> [1]."
            )
        if "nothing" in last.lower():
            return "The sources do not contain the answer."
        return "The **aardvark** module needs zlib [1][9]."
    if "def solution():" in everything:  # PAL
        return PROGRAM
    if "exploring documents" in everything:  # ReAct, text mode
        if "Observation" in last and "stubborn" not in everything:
            return "Thought: The guide says zlib.\nAction: finish[zlib]"
        return "Thought: I should look up the aardvark module.\nAction: search[aardvark]"
    return f"Echo: {last}"


class PagedModel(ScriptedChatModel):
    """The scripted model, streaming one word every ``delay_s`` when a prompt says "slowly";
    records whether a stream was closed before its end (the server cancelled it)."""

    def __init__(self, delay_s: float = 0.05) -> None:
        super().__init__(scripted_reply)
        self.model = "scripted"  # the served model's name, as a model server says it
        self.delay_s = delay_s
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.counter = 0
        self.lock = threading.Lock()

    def _reply(self, messages, **options):  # type: ignore[no-untyped-def]
        text = super()._reply(messages, **options)
        if text.startswith("Echo"):  # each sample differs, as a sampling server's would
            with self.lock:
                self.counter += 1
                text += f" (take {self.counter})"
        return text

    def stream(self, messages, settings=None, **options):  # type: ignore[no-untyped-def]
        slow = "slowly" in messages[-1]["content"]
        pieces = super().stream(messages, settings, **options)
        try:
            for delta in pieces:
                if slow:
                    time.sleep(self.delay_s)
                yield delta
            self.finished.set()
        except GeneratorExit:
            self.cancelled.set()
            raise


class FakeSandbox:
    """PAL's sandbox in these tests: the page is tested, not the sandbox."""

    def run(self, code: str, **options: Any) -> SandboxResult:
        return SandboxResult(value=42, stdout="boxes 6\n", duration_ms=1.0, isolation="fake")


@dataclass
class Served:
    url: str
    model: PagedModel
    feedback: FeedbackStore
    conversations: ConversationStore
    index: Index
    upload_dir: Path
    docs: Path
    app: Any = None
    server: Any = field(default=None, repr=False)
    thread: Any = field(default=None, repr=False)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.index.close()
        self.feedback.close()
        self.conversations.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(app: Any) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", server_header=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


def start(
    tmp: Path,
    *,
    api_keys: tuple[str, ...] = (),
    delay_s: float = 0.05,
    wrap: Callable[[Any], Any] | None = None,
) -> Served:
    """The API over a small index (one document carries hostile HTML) with uploads, a folder
    root, feedback and conversations, served on 127.0.0.1 (through ``wrap``, an ASGI middleware,
    if given)."""
    docs = tmp / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "guide" / "install.md").write_text(
        "# Installing\n\nRun the setup script to install the toolkit.\n\n"
        "## Requirements\n\nPython 3.10 or newer is required. The aardvark module needs zlib.\n"
    )
    (docs / "hostile.md").write_text(XSS_DOC)
    (tmp / "more").mkdir()
    (tmp / "more" / "walrus.md").write_text("# Walrus\n\nThe walrus release fixed PDFs.\n")
    settings = Settings(index=tmp / "index", cache_dir=tmp / "cache")
    embedder = HashingEmbedder()
    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    index = Index.open(settings.index, settings=settings, embedder=embedder)
    feedback = FeedbackStore(tmp / "feedback.sqlite")
    conversations = ConversationStore(tmp / "conversations.sqlite")
    model = PagedModel(delay_s)
    config = ApiConfig(
        api_keys=api_keys,
        upload_dir=str(tmp / "uploads"),
        document_roots=(str(tmp / "more"),),
        max_body_bytes=200_000,
    )
    app = create_app(
        model,
        index,
        feedback=feedback,
        conversations=conversations,
        config=config,
        settings=settings,
        sandbox=FakeSandbox(),  # type: ignore[arg-type]
    )
    url, server, thread = serve_app(wrap(app) if wrap else app)
    return Served(
        url, model, feedback, conversations, index, tmp / "uploads", tmp / "more", app, server,
        thread,
    )  # fmt: skip


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    running = start(tmp_path)
    yield running
    running.stop()


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


_CHROMIUM: dict[str, Any] = {}  # one Chromium for the whole run, whichever module asks first


def _close_chromium() -> None:
    if "browser" in _CHROMIUM:
        _CHROMIUM.pop("browser").close()
        _CHROMIUM.pop("playwright").stop()


@pytest.fixture(scope="session")
def browser() -> Any:
    """Debian's Chromium under Playwright; the test skips when either is missing. Started once:
    each test module imports this fixture, and Playwright's sync API runs one instance a thread.
    """
    if "browser" not in _CHROMIUM:
        path = chromium_path()
        if path is None:
            pytest.skip(
                "no Chromium found: install Debian's chromium package "
                "(scripts/setup.sh does, as root)"
            )
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            pytest.skip("Playwright is not installed: pip install -e '.[dev]'")
        playwright = sync_playwright().start()
        _CHROMIUM["playwright"] = playwright
        _CHROMIUM["browser"] = playwright.chromium.launch(executable_path=path)
        atexit.register(_close_chromium)
    return _CHROMIUM["browser"]


class PageLog:
    """What a page did that a test may check: requests, dialogs, console errors."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context's page; ``page.log`` records requests, dialogs and errors.
    Dialogs of the page's own (confirm before a delete) are accepted."""
    context = browser.new_context(accept_downloads=True)
    opened = context.new_page()
    opened.set_default_timeout(10_000)
    log = PageLog()
    opened.on("request", lambda r: log.requests.append(r.url))

    def on_dialog(dialog: Any) -> None:
        log.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.accept() if dialog.type == "confirm" else dialog.dismiss()

    opened.on("dialog", on_dialog)
    opened.on("pageerror", lambda e: log.errors.append(str(e)))
    opened.on("console", lambda m: log.errors.append(m.text) if m.type == "error" else None)
    opened.log = log
    yield opened
    context.close()


def open_page(page: Any, url: str, hash_: str = "") -> Any:
    page.goto(url + "/" + hash_)
    page.wait_for_selector("body[data-ready=true]")
    return page
