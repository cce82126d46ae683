"""The README's SDK examples run, against the real model server (integration)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from conftest import free_port

from agentkit import Index, index_folder
from agentkit.llm import OpenAIChatModel
from agentkit.services.api import create_app
from agentkit.settings import Settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def run_block(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_readme_has_both_sdk_examples() -> None:
    assert len(BLOCKS) == 2 and "connect()" in BLOCKS[0] and "Client(" in BLOCKS[1]


def test_the_in_process_example(llm_url: str) -> None:
    out = run_block(BLOCKS[0], {"AGENTKIT_LLM_URL": llm_url})
    lines = out.strip().splitlines()
    assert "Larkspur" in lines[0] and "release-notes.txt" in lines[0]
    assert lines[1].strip() in ("7", "7.0")


def test_the_rest_client_example(llm_url: str, tmp_path: Path) -> None:
    settings = Settings(index=tmp_path / "index")
    index_folder(ROOT / "examples" / "sample-docs", settings.index, settings=settings)
    with Index.open(settings.index) as index:
        port = free_port()
        app = create_app(OpenAIChatModel(llm_url), index)
        server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            out = run_block(BLOCKS[1], {"AGENTKIT_API_URL": f"http://127.0.0.1:{port}"})
        finally:
            server.should_exit = True
            thread.join()
    assert "Larkspur" in out and "release-notes.txt" in out
