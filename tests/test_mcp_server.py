"""agentkit as an MCP server: the tools and resources through the official Python client (in
process and over stdio with ``agentkit mcp``), the MCP Inspector's CLI as a client nobody here
wrote, and bad input answered with MCP error results while the server stays up."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the mcp extra is not installed (pip install 'agentkit[mcp]')")

from fake_server import MODELS, completion_body, fake_server  # noqa: E402
from fakes import HashingEmbedder  # noqa: E402
from mcp import Client  # noqa: E402

from agentkit import Index, index_folder  # noqa: E402
from agentkit.agents import AgentContext  # noqa: E402
from agentkit.llm import OpenAIChatModel  # noqa: E402
from agentkit.services.mcp_server import create_mcp_server  # noqa: E402
from agentkit.settings import Settings  # noqa: E402
from agentkit.testing import ScriptedChatModel  # noqa: E402
from agentkit.tools.sandbox import Sandbox  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INSPECTOR = ROOT / ".npm-tools" / "node_modules" / ".bin" / "mcp-inspector"
PROGRAM = "```python\ndef solution():\n    return 6 * 7\n```"


def with_client(server: Any, work: Callable[[Client], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with Client(server) as client:
            return await work(client)

    return asyncio.run(main())


@pytest.fixture
def index(docs: Path, settings: Settings, embedder: HashingEmbedder) -> Iterator[Index]:
    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as opened:
        yield opened


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(timeout_s=5) as box:
        yield box


def server_for(model: Any, settings: Settings, index: Index | None, sandbox: Sandbox) -> Any:
    context = AgentContext(model, settings, index=index, sandbox=sandbox)
    return create_mcp_server(context)


def test_the_tools_have_schemas_and_descriptions_written_for_models(
    settings: Settings, index: Index, sandbox: Sandbox
) -> None:
    server = server_for(ScriptedChatModel([]), settings, index, sandbox)
    tools = {t.name: t for t in with_client(server, lambda c: c.list_tools()).tools}
    assert set(tools) == {"search", "ask", "solve", "react"}
    search = tools["search"].input_schema
    assert search["required"] == ["query"] and search["properties"]["k"]["maximum"] == 20
    assert "citing" in tools["search"].description
    assert tools["solve"].input_schema["properties"]["problem"]["description"]
    assert "answer" in tools["ask"].output_schema["properties"]


def test_creating_the_server_leaves_the_applications_logging_as_it_was(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MCPServer configures the root logger at INFO by default: behind the API that logged and
    # rendered every httpx request of every chat.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    create_mcp_server(AgentContext(ScriptedChatModel([]), settings))
    assert root.getEffectiveLevel() == logging.WARNING
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)


def test_search_returns_hits_that_name_their_documents(
    settings: Settings, index: Index, sandbox: Sandbox
) -> None:
    server = server_for(ScriptedChatModel([]), settings, index, sandbox)
    done = with_client(server, lambda c: c.call_tool("search", {"query": "zlib", "k": 2}))
    assert not done.is_error
    hits = done.structured_content["hits"]
    assert len(hits) == 2 and hits[0]["number"] == 1
    assert any("zlib" in h["text"] for h in hits) and hits[0]["source"] and hits[0]["location"]


def test_ask_solve_and_react_run_through_the_agents(
    settings: Settings, index: Index, sandbox: Sandbox
) -> None:
    model = ScriptedChatModel(
        [
            "The aardvark module needs zlib [1].",
            PROGRAM,
            "Thought: search\nAction: search[zlib]",
            "Thought: done\nAction: finish[aardvark]",
        ]
    )
    server = server_for(model, settings, index, sandbox)

    async def work(client: Client) -> list[Any]:
        return [
            await client.call_tool("ask", {"question": "Which module needs zlib?"}),
            await client.call_tool("solve", {"problem": "Six sevens?"}),
            await client.call_tool("react", {"question": "Which module needs zlib?"}),
        ]

    ask, solve, react = (r.structured_content for r in with_client(server, work))
    assert ask["answer"] == "The aardvark module needs zlib [1]." and ask["answered"]
    assert ask["citations"][0]["number"] == 1
    assert solve == {"ok": True, "value": "42", "program": PROGRAM[10:-4], "error": None}
    assert react["answer"] == "aardvark" and react["finished"]
    assert [s["action"] for s in react["steps"]] == ["search", "finish"]


def test_the_index_documents_are_resources(
    settings: Settings, index: Index, sandbox: Sandbox
) -> None:
    server = server_for(ScriptedChatModel([]), settings, index, sandbox)

    async def work(client: Client) -> tuple[Any, Any]:
        listed = await client.list_resources()
        uri = next(r.uri for r in listed.resources if r.name == "guide/install.md")
        return listed, await client.read_resource(uri)

    listed, read = with_client(server, work)
    assert {r.name for r in listed.resources} == {"guide/install.md", "notes.txt", "page.html"}
    assert all(str(r.uri).startswith("agentkit://documents/") for r in listed.resources)
    assert "aardvark module needs zlib" in read.contents[0].text


def test_bad_input_is_an_mcp_error_result_and_the_server_stays_up(
    settings: Settings, index: Index, sandbox: Sandbox, tmp_path: Path
) -> None:
    empty = Index.create(tmp_path / "empty", settings=settings, embedder=HashingEmbedder())
    down = OpenAIChatModel("http://127.0.0.1:9", model="x", max_retries=0, timeout_s=2)
    with_index = server_for(down, settings, index, sandbox)
    without_docs = server_for(down, settings, empty, sandbox)

    async def work(client: Client) -> list[Any]:
        results = []
        for name, arguments in [
            ("nonexistent", {}),
            ("search", {"query": "zlib", "k": 100}),
            ("search", {}),
            ("ask", {"question": "Which module needs zlib?"}),
        ]:
            try:
                results.append(await client.call_tool(name, arguments))
            except Exception as error:  # a protocol error is an answer too
                results.append(error)
        results.append(await client.call_tool("search", {"query": "zlib"}))
        return results

    unknown, too_many, missing, model_down, still_up = with_client(with_index, work)
    assert "nonexistent" in message(unknown)
    assert too_many.is_error and "k" in message(too_many) and "20" in message(too_many)
    assert missing.is_error and "query" in message(missing)
    assert model_down.is_error and "no model server at http://127.0.0.1:9" in message(model_down)
    assert not still_up.is_error and still_up.structured_content["hits"]
    empty_result = with_client(without_docs, lambda c: c.call_tool("search", {"query": "x"}))
    assert empty_result.is_error and "the index is empty" in message(empty_result)
    empty.close()


def message(result: Any) -> str:
    if isinstance(result, Exception):
        return str(result)
    return " ".join(getattr(block, "text", "") for block in result.content)


# --- over stdio: `agentkit mcp`, with the official client and with the Inspector -------------


@pytest.fixture
def program_server() -> Iterator[str]:
    """A model server that always writes the same program."""

    def handler(path: str, body: object, number: int) -> tuple[int, dict[str, str], bytes]:
        payload = MODELS if path.endswith("/models") else completion_body(PROGRAM)
        return 200, {"Content-Type": "application/json"}, payload

    with fake_server(handler) as (url, _):
        yield url


def agentkit_mcp(tmp_path: Path, llm_url: str) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTKIT_", "OTEL_"))}
    env.update(AGENTKIT_LLM_URL=llm_url, AGENTKIT_INDEX=str(tmp_path / "no-index"))
    return [sys.executable, "-m", "agentkit.cli", "mcp"], env


def test_agentkit_mcp_over_stdio_with_the_official_client(
    tmp_path: Path, program_server: str
) -> None:
    from agentkit.errors import ToolError
    from agentkit.mcp_client import MCPConnection

    command, env = agentkit_mcp(tmp_path, program_server)
    spec = {"command": " ".join(command), "env": env, "connect_timeout_s": 120}
    with MCPConnection(spec) as connection:
        tools = {t.name: t for t in connection.tools()}
        assert set(tools) == {"search", "ask", "solve", "react"}
        assert json.loads(tools["solve"]("Six sevens?"))["value"] == "42"
        with pytest.raises(ToolError, match="this server has no index"):
            tools["search"]("zlib")
        assert json.loads(tools["solve"]("Again?"))["ok"] is True  # still up


def inspector_or_skip() -> str:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the MCP Inspector runs on node")
    if not INSPECTOR.exists():
        pytest.skip(f"{INSPECTOR} is missing: ./scripts/setup.sh dev installs it with npm")
    return str(INSPECTOR)


def inspector(args: list[str], env: dict[str, str], tmp_path: Path) -> Any:
    """The Inspector's answer; a stdio server gets only the variables passed with -e."""
    passed = [f"{k}={v}" for k, v in env.items() if k.startswith("AGENTKIT_")]
    done = subprocess.run(
        [
            inspector_or_skip(),
            "--cli",
            "--connect-timeout",
            "150000",
            *[a for kv in passed for a in ("-e", kv)],
            *args,
        ],  # fmt: skip
        env={**env, "MCP_CATALOG_PATH": str(tmp_path / "catalog.json")},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_inspector_cli_lists_and_calls_the_stdio_servers_tools(
    tmp_path: Path, program_server: str
) -> None:
    command, env = agentkit_mcp(tmp_path, program_server)
    listed = inspector([*command, "--method", "tools/list"], env, tmp_path)
    assert {t["name"] for t in listed["tools"]} == {"search", "ask", "solve", "react"}
    called = inspector(
        [*command, "--method", "tools/call", "--tool-name", "solve", "--tool-arg", "problem=6*7?"],
        env,
        tmp_path,
    )
    assert called["isError"] is False and called["structuredContent"]["value"] == "42"


# --- over streamable HTTP: /mcp on the API, behind its keys ----------------------------------


@pytest.fixture
def api_mcp(settings: Settings, index: Index, sandbox: Sandbox) -> Iterator[str]:
    from fake_server import serving

    from agentkit.services.api import ApiConfig, create_app

    app = create_app(
        ScriptedChatModel([PROGRAM] * 4),
        index,
        config=ApiConfig(api_keys=("secret-key",)),
        sandbox=sandbox,
        settings=settings,
    )
    with serving(app) as base:
        yield f"{base}/mcp"


def test_the_api_serves_mcp_at_slash_mcp_behind_its_keys(api_mcp: str) -> None:
    from agentkit.errors import ToolError
    from agentkit.mcp_client import MCPConnection

    spec = {"url": api_mcp, "headers": {"Authorization": "Bearer secret-key"}}
    with MCPConnection(spec) as connection:
        tools = {t.name: t for t in connection.tools()}
        hits = json.loads(tools["search"]({"query": "zlib", "k": 2}))["hits"]
        assert hits and not hits[0]["location"].startswith("/")  # no server paths
        assert json.loads(tools["solve"]("Six sevens?"))["value"] == "42"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(ToolError, match="cannot connect"):
            MCPConnection({"url": api_mcp, "headers": headers, "connect_timeout_s": 20}).open()


def test_the_inspector_cli_lists_and_calls_the_http_servers_tools(
    api_mcp: str, tmp_path: Path
) -> None:
    auth = ["--header", "Authorization: Bearer secret-key"]
    listed = inspector([api_mcp, *auth, "--method", "tools/list"], dict(os.environ), tmp_path)
    assert {t["name"] for t in listed["tools"]} == {"search", "ask", "solve", "react"}
    called = inspector(
        [
            api_mcp,
            *auth,
            "--method",
            "tools/call",
            "--tool-name",
            "search",
            "--tool-arg",
            "query=zlib",
        ],
        dict(os.environ),
        tmp_path,
    )
    assert called["isError"] is False and called["structuredContent"]["hits"]
