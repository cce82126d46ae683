"""AGENTKIT_RAG_* settings reach both CLI entry points that answer from the index.

``agentkit ask`` and ``agentkit chat`` both build RAG through the agent runner's one
constructor; a local fake model server records what they asked for. (The API's plain and
streaming chat are checked in the API tests, the runner itself in test_agents.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_server import MODELS, completion_body, fake_server
from typer.testing import CliRunner

from agentkit.cli import app

pytestmark = pytest.mark.integration  # the real embedding model indexes the sample docs
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample-docs"
QUESTION = "What was the code name of the first release?"


def answer(path: str, body: dict | None, number: int) -> tuple[int, dict[str, str], bytes]:
    if path == "/v1/models":
        return 200, {"Content-Type": "application/json"}, MODELS
    if path == "/tokenize":
        count = sum(len(m["content"]) // 4 for m in (body or {}).get("messages", []))
        return 200, {"Content-Type": "application/json"}, json.dumps({"count": count}).encode()
    return 200, {"Content-Type": "application/json"}, completion_body("It was Aurora [1].")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("cli-settings") / "index")
    result = CliRunner().invoke(app, ["index", str(SAMPLE), "--index", folder, "--json"])
    assert result.exit_code == 0, result.stdout
    return folder


def prompts(log: list) -> list[dict]:
    return [body for path, body in log if path == "/v1/chat/completions"]


@pytest.mark.parametrize("entry", ["ask", "chat"])
def test_rag_settings_reach_the_cli(entry: str, index: str, monkeypatch) -> None:
    with fake_server(answer) as (url, log):
        monkeypatch.setenv("AGENTKIT_LLM_URL", url)
        monkeypatch.setenv("AGENTKIT_INDEX", index)
        monkeypatch.setenv("AGENTKIT_RAG_K", "2")
        monkeypatch.setenv("AGENTKIT_RAG_MAX_TOKENS", "50")
        monkeypatch.setenv("AGENTKIT_RAG_MIN_SIMILARITY", "0.0")
        args, stdin = (["ask", QUESTION], None) if entry == "ask" else (["chat"], f"{QUESTION}\n")
        result = CliRunner().invoke(app, args, input=stdin)
        assert result.exit_code == 0, result.stdout
        (request,) = prompts(log)
        prompt = request["messages"][-1]["content"]
        assert "[2] " in prompt and "[3] " not in prompt  # AGENTKIT_RAG_K
        assert request["max_tokens"] <= 50  # AGENTKIT_RAG_MAX_TOKENS
        log.clear()
        monkeypatch.setenv("AGENTKIT_RAG_MIN_SIMILARITY", "0.999")
        result = CliRunner().invoke(app, args, input=stdin)
        assert result.exit_code == 0, result.stdout
        assert prompts(log) == []  # no source is similar enough: the model is not asked
