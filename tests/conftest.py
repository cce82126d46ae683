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
