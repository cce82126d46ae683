"""MCP servers' tools in agentkit: a small SDK server (tests/mcp_test_server.py) over stdio and
streamable HTTP, the reference server ``@modelcontextprotocol/server-everything`` from npm, ReAct
in text and tool-call mode, and a hostile server."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mcp", reason="the mcp extra is not installed (pip install 'agentkit[mcp]')")

from fake_server import serving  # noqa: E402

from agentkit.errors import ConfigError, ToolError  # noqa: E402
from agentkit.mcp_client import MCPConnection, MCPServerSpec, mcp_tools  # noqa: E402
from agentkit.react import ReAct  # noqa: E402
from agentkit.testing import ScriptedChatModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVER = f"{sys.executable} {ROOT / 'tests' / 'mcp_test_server.py'}"
EVERYTHING = ROOT / ".npm-tools" / "node_modules" / ".bin" / "mcp-server-everything"


def everything_or_skip() -> str:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the reference MCP server runs on node")
    if not EVERYTHING.exists():
        pytest.skip(f"{EVERYTHING} is missing: ./scripts/setup.sh dev installs it with npm")
    return str(EVERYTHING)


@pytest.fixture(scope="module")
def server() -> Iterator[MCPConnection]:
    with MCPConnection({"command": SERVER, "timeout_s": 10}) as connection:
        yield connection


def tools_of(connection: MCPConnection) -> dict[str, object]:
    return {t.name: t for t in connection.tools()}


def test_specs_are_commands_or_urls_and_exactly_one_of_them() -> None:
    assert MCPServerSpec.model_validate("python -m srv").command == "python -m srv"
    assert MCPServerSpec.model_validate("https://h.example/mcp").url == "https://h.example/mcp"
    with pytest.raises(ValueError, match="exactly one"):
        MCPServerSpec(command="x", url="http://h")
    with pytest.raises(ConfigError, match="bad MCP server"):
        MCPConnection({"command": "  "})


def test_stdio_tools_are_listed_with_safe_names_and_their_schemas(server: MCPConnection) -> None:
    tools = tools_of(server)
    assert {"add", "shout", "city_weather", "picture", "fail", "hang", "die"} <= set(tools)
    add = tools["add"]
    assert add.description == "Add two integers."
    assert add.input_schema["required"] == ["a", "b"]
    assert add.openai_schema()["function"]["parameters"] == add.input_schema
    assert '"a":{' in add.describe() and add.describe().startswith("- add[JSON arguments]:")
    assert tools["city_weather"].remote_name == "city-weather"


def test_calls_take_a_dict_json_text_or_one_string(server: MCPConnection) -> None:
    tools = tools_of(server)
    assert tools["add"]({"a": 2, "b": 3}) == "5"
    assert tools["add"]('{"a": 40, "b": 2}') == "42"
    assert tools["shout"]("quiet") == "QUIET"
    assert tools["city_weather"]("Oslo") == "It is sunny in Oslo."


def test_arguments_are_checked_against_the_schema_before_the_call(server: MCPConnection) -> None:
    add = tools_of(server)["add"]
    with pytest.raises(ToolError, match="'x' is not of type 'integer'.*'b' is a required"):
        add({"a": "x"})
    with pytest.raises(ToolError, match=r'add takes JSON arguments: add\[\{"a"'):
        add("two and three")


def test_images_and_resources_become_text_that_says_what_they_are(server: MCPConnection) -> None:
    text = tools_of(server)["picture"]("")
    assert "[the tool returned image (image/png" in text and "not shown]" in text
    assert "[resource file:///notes.txt]\nthe notes" in text


def test_a_tool_error_is_a_tool_error_with_the_servers_message(server: MCPConnection) -> None:
    with pytest.raises(ToolError, match="failed on purpose: because"):
        tools_of(server)["fail"]("because")


def test_a_call_that_hangs_is_cut_off_at_the_timeout() -> None:
    with MCPConnection({"command": SERVER, "timeout_s": 0.5}) as connection:
        started = time.perf_counter()
        with pytest.raises(ToolError, match="did not answer within 0.5 s and was cut off"):
            tools_of(connection)["hang"]("")
        assert time.perf_counter() - started < 5
        assert tools_of(connection)["add"]({"a": 1, "b": 1}) == "2"  # the session goes on


def test_a_server_that_dies_is_reported_and_started_again(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    with MCPConnection(f"{SERVER} --pid-file {pids}") as connection:
        with pytest.raises(ToolError, match="stopped during the call to die.*started again"):
            tools_of(connection)["die"]("")
        assert tools_of(connection)["add"]({"a": 2, "b": 2}) == "4"
        first, second = (int(p) for p in pids.read_text().split())
        assert first != second
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)
    with pytest.raises(ProcessLookupError):  # closing the connection ended the second one
        os.kill(second, 0)


def test_a_command_that_is_not_an_mcp_server_is_a_clear_error() -> None:
    with pytest.raises(ToolError, match="cannot connect to the MCP server .*false"):
        MCPConnection({"command": "false", "connect_timeout_s": 20}).open()


def test_react_text_mode_shows_the_schema_and_calls_the_mcp_tool(server: MCPConnection) -> None:
    model = ScriptedChatModel(
        [
            'Thought: add them\nAction: add[{"a": 20, "b": 22}]',
            "Thought: done\nAction: finish[42]",
        ]
    )
    result = ReAct(model, mcp_servers=[server], structured=False).run("What is 20 + 22?")
    assert result.answer == "42"
    assert result.steps[0].observation == "42" and not result.steps[0].tool_error
    prompt = model.calls[0].messages[0]["content"] + model.calls[0].messages[-1]["content"]
    assert "add[JSON arguments]: Add two integers." in prompt
    assert "city_weather[JSON arguments]" in prompt


def test_react_tool_call_mode_sends_the_mcp_schemas_and_calls_the_tool(
    server: MCPConnection,
) -> None:
    model = ScriptedChatModel(['shout({"text": "louder"})', "It says LOUDER."])
    result = ReAct(model, mcp_servers=[server], mode="tools").run("Shout louder.")
    assert result.steps[0].action == "shout" and result.steps[0].observation == "LOUDER"
    assert result.answer == "It says LOUDER."
    sent = {t["function"]["name"]: t for t in model.calls[0].kwargs["tools"]}
    assert sent["shout"]["function"]["parameters"]["properties"]["text"]["type"] == "string"


def test_bad_arguments_from_the_model_are_its_observation(server: MCPConnection) -> None:
    model = ScriptedChatModel(
        ['Thought: t\nAction: add[{"a": "two"}]', "Thought: t\nAction: finish[no]"]
    )
    step = ReAct(model, mcp_servers=[server], structured=False).run("q").steps[0]
    assert step.tool_error and "bad arguments for add" in step.observation


def test_a_react_agent_keeps_its_connections_across_questions() -> None:
    model = ScriptedChatModel(
        ['Thought: t\nAction: add[{"a": 1, "b": 2}]', "Thought: t\nAction: finish[3]"] * 2
    )
    with ReAct(model, mcp_servers=[SERVER], structured=False) as agent:
        (connection,) = agent.mcp_connections
        agent.run("1 + 2?")
        task = connection._task
        assert agent.run("1 + 2 again?").answer == "3"
        assert connection._task is task and connection.alive
    assert not connection.alive  # the agent opened it, so the agent closed it


def test_a_hostile_server_cannot_shadow_agentkit_tools_or_flood_the_prompt(
    index_for_react: object,
) -> None:
    with MCPConnection(f"{SERVER} --hostile") as hostile:
        listed = {t.name for t in hostile._tools}
        assert {"search", "finish", "broken_schema"} <= listed
        tools = {t.name: t for t in mcp_tools([hostile], taken=["search", "lookup", "finish"])}
        assert "search" not in tools and "finish" not in tools
        assert "mcp_test_server_search" in tools and "broken_schema" not in tools
        flood = tools["mcp_test_server_finish"].description
        assert len(flood) == 600 and "\n" not in flood
        model = ScriptedChatModel(
            ["Thought: t\nAction: search[zlib]", "Thought: t\nAction: finish[aardvark]"]
        )
        result = ReAct(model, index=index_for_react, mcp_servers=[hostile]).run("zlib?")
        assert "hostile" not in result.steps[0].observation  # the index's own search ran


@pytest.fixture
def index_for_react(docs: Path, settings, embedder) -> Iterator[object]:
    from agentkit import Index, index_folder

    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as opened:
        yield opened


def test_streamable_http_with_a_bearer_header() -> None:
    import mcp_test_server

    with serving(mcp_test_server.app("s3cret")) as base:
        spec = {"url": f"{base}/mcp", "headers": {"Authorization": "Bearer s3cret"}}
        with MCPConnection(spec) as connection:
            assert tools_of(connection)["add"]({"a": 5, "b": 6}) == "11"
        with pytest.raises(ToolError, match="cannot connect to the MCP server"):
            MCPConnection({"url": f"{base}/mcp", "connect_timeout_s": 20}).open()


def test_the_reference_server_everything_over_stdio() -> None:
    command = everything_or_skip()
    with MCPConnection({"command": command, "connect_timeout_s": 60}) as everything:
        tools = tools_of(everything)
        assert tools["echo"]("hello") == "Echo: hello"
        assert tools["get_sum"]({"a": 2, "b": 3}) == "The sum of 2 and 3 is 5."
        image = tools["get_tiny_image"]({})
        assert "[the tool returned image (image/png" in image
        with pytest.raises(ToolError, match="bad arguments for get_sum"):
            tools["get_sum"]({"a": "two", "b": 3})


def test_a_stdio_server_does_not_get_agentkits_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    command = everything_or_skip()
    monkeypatch.setenv("AGENTKIT_LLM_API_KEY", "sk-do-not-leak")
    with MCPConnection(command) as everything:
        seen = tools_of(everything)["get_env"]({})
    assert "sk-do-not-leak" not in seen and "PATH" in seen


@pytest.mark.integration
def test_the_real_model_answers_by_calling_an_mcp_tool(llm_url: str) -> None:
    from agentkit.llm import OpenAIChatModel

    model = OpenAIChatModel(llm_url, timeout_s=300)
    with MCPConnection(SERVER) as connection:
        agent = ReAct(model, mcp_servers=[connection], mode="tools", max_steps=3)
        result = agent.run("Use the add tool to add 1234 and 4321. What is the sum?")
    calls = [s for s in result.steps if s.action == "add"]
    assert calls, json.dumps(result.to_dict(), indent=1)[:2000]
    assert calls[0].observation == str(1234 + 4321)


def test_the_cli_react_command_takes_mcp_servers(tmp_path: Path) -> None:
    import subprocess

    from fake_server import MODELS, completion_body, fake_server

    steps = ['Thought: add\nAction: add[{"a": 2, "b": 3}]', "Thought: done\nAction: finish[5]"]

    def handler(path: str, body: object, number: int) -> tuple[int, dict[str, str], bytes]:
        if path.endswith("/models"):
            return 200, {"Content-Type": "application/json"}, MODELS
        return 200, {"Content-Type": "application/json"}, completion_body(steps.pop(0))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTKIT_", "OTEL_"))}
    cli = [sys.executable, "-c", "from agentkit.cli import main; main()"]
    with fake_server(handler) as (url, _):
        done = subprocess.run(
            [*cli, "react", "2 + 3?", "--llm-url", url, "--mcp", SERVER, "--json"],
            cwd=tmp_path,  # no index here: with MCP servers, none is needed
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["answer"] == "5" and data["steps"][0]["observation"] == "5"


def test_the_api_react_agent_uses_the_configured_mcp_servers(
    settings, index_for_react: object
) -> None:
    import httpx

    from agentkit.services.api import create_app

    configured = settings.model_copy(update={"mcp_servers": [MCPServerSpec(command=SERVER)]})
    model = ScriptedChatModel(
        ['Thought: add\nAction: add[{"a": 40, "b": 2}]', "Thought: done\nAction: finish[42]"]
    )
    app = create_app(model, index_for_react, settings=configured)
    body = {"model": "agentkit-react", "messages": [{"role": "user", "content": "40 + 2?"}]}
    try:
        with serving(app) as base:
            reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
    finally:
        for connection in app.state.api.context.mcp or []:
            connection.close()
    steps = reply["agentkit"]["react"]["steps"]
    assert steps[0]["action"] == "add" and steps[0]["observation"] == "42"
    assert reply["choices"][0]["message"]["content"] == "42"
