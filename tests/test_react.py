"""Tools and the ReAct loop with the scripted model over a small index."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from fakes import HashingEmbedder

from agentkit import Index, LoadedDocument
from agentkit.errors import ToolError
from agentkit.react import ReAct, Step, Trajectory, parse_step, step_regex
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel
from agentkit.tools.docs import DocumentExplorer
from agentkit.tools.registry import ToolRegistry, tool

ANDREWS = (
    "James J. Andrews (c. 1829 – June 7, 1862) was a Kentucky civilian. He led a raid. "
    "He was executed in Atlanta. Andrews was born in Virginia. He moved to Kentucky. "
    "In Kentucky he was a painter. He sang in a choir."
)


@pytest.fixture
def index(settings: Settings, embedder: HashingEmbedder):
    docs = [
        LoadedDocument(
            source=t, text=x, title=t, format="txt", content_hash=t, root="r", has_lines=False
        )
        for t, x in [
            ("James J. Andrews", ANDREWS),
            (
                "Great Locomotive Chase",
                "The Great Locomotive Chase was a raid led by James J. Andrews.",
            ),
            ("Andrews (surname)", "Andrews is a surname."),
        ]
    ]
    with Index.create(settings.index, settings=settings, embedder=embedder) as created:
        created.add_documents(docs)
        yield created


def test_search_finds_titles_exactly_then_loosely_else_lists_similar(index: Index) -> None:
    explorer = DocumentExplorer(index)
    first = explorer.search("James J. Andrews")
    assert first.startswith("James J. Andrews (c. 1829") and first.endswith("He moved to Kentucky.")
    assert explorer.search("james j andrews") == first and explorer.current == "James J. Andrews"
    missing = explorer.search("locomotive raid")
    assert missing.startswith("Could not find [locomotive raid]. Similar: [")
    assert "'Great Locomotive Chase'" in missing


def test_lookup_walks_sentences_with_the_keyword_and_restarts_on_a_new_one(index: Index) -> None:
    explorer = DocumentExplorer(index)
    assert explorer.lookup("Kentucky").startswith("No current document")
    explorer.search("James J. Andrews")
    assert (
        explorer.lookup("kentucky")
        == "(Result 1 / 3) James J. Andrews (c. 1829 – June 7, 1862) was a Kentucky civilian."
    )
    assert explorer.lookup("Kentucky") == "(Result 2 / 3) He moved to Kentucky."
    assert explorer.lookup("Kentucky") == "(Result 3 / 3) In Kentucky he was a painter."
    assert explorer.lookup("Kentucky") == "No more results."
    assert explorer.lookup("choir") == "(Result 1 / 1) He sang in a choir."


def test_a_function_becomes_a_validated_tool_in_three_lines() -> None:
    @tool
    def add(a: int, b: int = 1) -> int:
        """Add two numbers."""
        return a + b

    assert (add.name, add.description) == ("add", "Add two numbers.")
    assert add({"a": 2, "b": 3}) == 5 and add("4") == 5 and add('{"a": 1, "b": 1}') == 2
    with pytest.raises(ToolError, match="bad arguments for add: a:"):
        add({"a": "many"})
    assert add.openai_schema()["function"]["parameters"]["required"] == ["a"]


def test_async_tools_and_missing_docstrings() -> None:
    @tool
    async def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper()

    assert shout("hi") == "HI" and asyncio.run(shout.acall("yo")) == "YO"
    with pytest.raises(ToolError, match="docstring"):
        tool(lambda x: x)
    registry = ToolRegistry([shout])
    with pytest.raises(ToolError, match="already registered"):
        registry.register(shout)
    assert registry.get("SHOUT") is shout


def test_langchain_tools_can_be_wrapped() -> None:
    from agentkit.tools.registry import from_langchain

    class Fake:  # the duck type of a LangChain BaseTool
        name, description, args_schema = "echo", "Echo the input.", None

        def invoke(self, value):
            return f"echo {value}"

    wrapped = from_langchain(Fake())
    assert wrapped("x") == "echo x" and wrapped.name == "echo"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Thought: go\nAction: search[Paris]", ("go", "search", "Paris")),
        ("thought 2 : go\naction 2: Search [ Big Apple ]", ("go", "Search", "Big Apple")),
        ("Thought: a\nAction: finish[Kentucky", ("a", "finish", "Kentucky")),
        ("Action: lookup(year)", ("", "lookup", "year")),
        ("Let me look.\nsearch[Nile]", ("", "search", "Nile")),
        ("Thought: nothing to do", None),
    ],
)
def test_the_tolerant_parser(text, expected) -> None:
    assert parse_step(text) == expected


def test_the_step_regex_admits_only_registered_tools() -> None:
    pattern = step_regex(["search", "finish"])
    assert re.fullmatch(pattern, "Thought: x\nAction: search[Paris]")
    assert not re.fullmatch(pattern, "Thought: x\nAction: delete[Paris]")
    assert "{" not in pattern  # bounded repeats make xgrammar time out


def test_a_run_searches_looks_up_and_finishes_with_structured_steps(index: Index) -> None:
    model = ScriptedChatModel(
        [
            "Thought: Find the raid.\nAction: search[Great Locomotive Chase]",
            "Thought: Led by Andrews.\nAction: search[James J. Andrews]",
            "Thought: Where from?\nAction: lookup[Kentucky]",
            "Thought: Kentucky.\nAction: finish[Kentucky]",
        ]
    )
    seen: list[Step] = []
    result = ReAct(model, index=index, on_step=seen.append).run("Where was the raid's leader from?")
    assert result.answer == "Kentucky" and result.finished and not result.fallback
    assert [s.action for s in result.steps] == ["search", "search", "lookup", "finish"]
    assert seen == result.steps and result.parse_failures == 0
    call = model.calls[-1]
    assert call.kwargs["stop"] == ["\nObservation"] and call.kwargs["structured"].regex
    assert call.messages[-1]["content"].startswith("Observation: (Result 1 / 3)")
    assert "- search[...]" in call.messages[0]["content"]


def test_bad_steps_become_observations_and_repeats_are_not_rerun(index: Index) -> None:
    model = ScriptedChatModel(
        [
            "I am not sure what to do.",
            "Thought: t\nAction: fly[away]",
            "Thought: t\nAction: search[Andrews (surname)]",
            "Thought: t\nAction: search[Andrews (surname)]",
            "Thought: t\nAction: finish[unknown]",
        ]
    )
    result = ReAct(model, index=index, structured=False).run("q")
    assert result.parse_failures == 2 and "Invalid step" in result.steps[0].observation
    assert result.steps[3].observation.startswith("You just did search[Andrews (surname)]")
    assert model.calls[0].kwargs["structured"] is None and result.answer == "unknown"


def test_the_step_limit_falls_back_to_rag(index: Index) -> None:
    model = ScriptedChatModel(
        lambda messages, **kw: (
            "Andrews was from Kentucky [1]."
            if kw.get("structured") is None and kw.get("stop") is None
            else "Thought: t\nAction: lookup[x]"
        )
    )
    result = ReAct(model, index=index, max_steps=2).run("Where was Andrews from?")
    assert result.fallback and not result.finished and len(result.steps) == 2
    assert result.answer.startswith("Andrews was from Kentucky")


def test_tool_errors_are_observations(index: Index) -> None:
    @tool
    def divide(a: int, b: int) -> float:
        """Divide a by b."""
        return a / b

    model = ScriptedChatModel(
        ['Thought: t\nAction: divide[{"a": 1, "b": 0}]', "Thought: t\nAction: finish[none]"]
    )
    items = list(ReAct(model, [divide]).steps("q"))
    assert isinstance(items[-1], Trajectory) and items[-1].tool_errors == 1
    assert "division by zero" in items[0].observation


def test_a_stuck_agent_samples_then_stops_and_falls_back(index: Index) -> None:
    stuck = "Thought: t\nAction: search[Andrews (surname)]"
    model = ScriptedChatModel(lambda m, **kw: stuck if kw.get("structured") else "RAG says hi.")
    result = ReAct(model, index=index, max_steps=8).run("q")
    assert len(result.steps) == 4 and result.fallback and result.answer == "RAG says hi."
    temperatures = [c.kwargs["temperature"] for c in model.calls[:4]]
    assert temperatures == [0.0, 0.0, 0.7, 0.7]


def test_tools_mode_uses_the_models_tool_calls(index: Index) -> None:
    model = ScriptedChatModel(
        [
            'search({"entity": "Great Locomotive Chase"})',
            'search({"entity": "James J. Andrews"})',
            'lookup({"keyword": "Kentucky"})',
            'finish({"answer": "Kentucky"})',
        ]
    )
    result = ReAct(model, index=index, mode="tools").run("Where was the raid's leader from?")
    assert result.answer == "Kentucky" and result.finished
    assert [(s.action, s.argument) for s in result.steps][:2] == [
        ("search", "Great Locomotive Chase"),
        ("search", "James J. Andrews"),
    ]
    last = model.calls[-1]
    names = [t["function"]["name"] for t in last.kwargs["tools"]]
    assert names == ["search", "lookup", "finish"]
    assert last.messages[-1]["role"] == "tool" and last.messages[-1]["content"].startswith(
        "(Result 1"
    )
    assert last.messages[-2]["tool_calls"][0]["function"]["name"] == "lookup"


def test_tools_mode_takes_a_plain_answer_as_the_end(index: Index) -> None:
    result = ReAct(ScriptedChatModel(["Kentucky."]), index=index, mode="tools").run("q")
    assert result.answer == "Kentucky." and result.finished and len(result.steps) == 1


def test_a_sampled_step_cut_off_before_its_action_is_drawn_again_greedily(index: Index) -> None:
    stuck = "Thought: t\nAction: search[Andrews (surname)]"

    def reply(messages, **kw):
        if not kw.get("structured"):
            return "fallback"
        return "Thought: a very long thought that never" if kw["temperature"] > 0 else stuck

    model = ScriptedChatModel(reply, check_structured=False)
    result = ReAct(model, index=index).run("q")
    assert result.parse_failures == 0 and len(result.steps) == 4
    assert [c.kwargs["temperature"] for c in model.calls[:5]] == [0.0, 0.0, 0.7, 0.0, 0.7]


def test_tool_calls_written_as_json_in_the_content_are_recovered() -> None:
    from agentkit.react import tool_call_from_text

    fenced = '```json\n{\n  "name": "search",\n  "arguments": {"entity": "Paris"}\n}\n```'
    call = tool_call_from_text(fenced, ["search", "finish"])
    assert call is not None and (call.name, json.loads(call.arguments)) == (
        "search",
        {"entity": "Paris"},
    )
    tagged = '<tool_call>{"name": "finish", "arguments": "done"}</tool_call>'
    assert tool_call_from_text(tagged, ["finish"]).arguments == "done"
    assert tool_call_from_text('{"name": "rm", "arguments": {}}', ["search"]) is None
    assert tool_call_from_text("Paris is in France.", ["search"]) is None


def test_titles_are_read_again_only_when_the_index_changes(index: Index) -> None:
    assert DocumentExplorer(index).search("Kestrel").startswith("Could not find")
    index.add_documents(
        [
            LoadedDocument(
                source="Kestrel",
                text="A kestrel is a falcon.",
                title="Kestrel",
                format="txt",
                content_hash="k",
                root="r",
                has_lines=False,
            )
        ]
    )
    assert DocumentExplorer(index).search("Kestrel") == "A kestrel is a falcon."


def test_tools_mode_gets_the_same_protection_against_a_stuck_agent(index: Index) -> None:
    stuck = 'search({"entity": "Andrews (surname)"})'
    model = ScriptedChatModel(lambda m, **kw: stuck if kw.get("tools") else "RAG says hi.")
    result = ReAct(model, index=index, mode="tools", max_steps=8).run("q")
    assert len(result.steps) == 4 and result.fallback and result.answer == "RAG says hi."
    assert result.steps[1].observation.startswith("You just did search[Andrews (surname)]")
    temperatures = [c.kwargs["temperature"] for c in model.calls[:4]]
    assert temperatures == [0.0, 0.0, 0.7, 0.7]


def test_a_cancelled_run_stops_before_its_next_step_without_a_fallback(index: Index) -> None:
    import threading

    cancel = threading.Event()
    model = ScriptedChatModel(["Thought: t\nAction: search[Andrews (surname)]"] * 5)
    agent = ReAct(model, index=index, structured=False, on_step=lambda step: cancel.set())
    result = agent.run("q", cancel)
    assert len(result.steps) == 1 and result.cancelled and not result.fallback
    assert len(model.calls) == 1  # neither another step nor the RAG fallback asked the model
    assert result.to_dict()["cancelled"] is True
