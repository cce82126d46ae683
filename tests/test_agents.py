"""The one agent runner: lookup by name, settings applied, one result shape, one event stream."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import HashingEmbedder

from agentkit import Index, index_folder
from agentkit.agents import (
    AgentContext,
    AgentRequest,
    AgentResult,
    AgentSpec,
    agent_names,
    get_agent,
    register_agent,
    run_agent,
    stream_agent,
)
from agentkit.errors import AgentkitError
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel


@pytest.fixture
def index(docs: Path, settings: Settings, embedder: HashingEmbedder):
    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as opened:
        yield opened


def test_the_built_in_agents_are_registered() -> None:
    assert {"agentkit-rag", "agentkit-pal", "agentkit-react"} <= set(agent_names())
    assert get_agent("some-served-model").run.__name__ == "run_model"  # passes through


def test_rag_settings_reach_the_runner(index: Index, settings: Settings) -> None:
    tuned = settings.model_copy(update={"rag_k": 2, "rag_max_tokens": 77,
                                        "rag_min_similarity": 0.0})  # fmt: skip
    model = ScriptedChatModel(["The aardvark module needs zlib [1]."] * 2)
    context = AgentContext(model, tuned, index=index)
    result = run_agent("agentkit-rag", context, AgentRequest.ask("Which module needs zlib?"))
    assert result.text.endswith("[1].") and result.data["citations"][0]["number"] == 1
    prompt = model.calls[0].messages[-1]["content"]
    assert "[2] " in prompt and "[3] " not in prompt  # k = 2
    assert model.calls[0].kwargs["max_tokens"] <= 77
    events = list(stream_agent("agentkit-rag", context, AgentRequest.ask("Which module?")))
    assert "".join(e.text for e in events).endswith("[1].")
    assert events[-1].data is not None and events[-1].usage is not None
    assert model.calls[1].kwargs["max_tokens"] <= 77


def test_a_requests_max_tokens_wins_over_the_setting(index: Index, settings: Settings) -> None:
    model = ScriptedChatModel(["zlib [1]."])
    context = AgentContext(model, settings.model_copy(update={"rag_min_similarity": 0.0}),
                           index=index)  # fmt: skip
    run_agent("agentkit-rag", context, AgentRequest.ask("zlib?", max_tokens=20))
    assert model.calls[0].kwargs["max_tokens"] <= 20


def test_react_streams_its_steps_then_the_answer(index: Index, settings: Settings) -> None:
    model = ScriptedChatModel(["Thought: t\nAction: finish[zlib]"])
    events = list(stream_agent("agentkit-react", AgentContext(model, settings, index=index),
                               AgentRequest.ask("q")))  # fmt: skip
    assert events[0].data is not None and events[0].data["step"]["action"] == "finish"
    assert events[-1].text == "zlib" and events[-1].usage is not None


def test_an_agent_without_a_stream_sends_its_result_whole(settings: Settings) -> None:
    model = ScriptedChatModel(["```python\ndef solution():\n    return 6 * 7\n```"])
    events = list(stream_agent("agentkit-pal", AgentContext(model, settings),
                               AgentRequest.ask("6 times 7?")))  # fmt: skip
    assert events[0].data is not None and events[0].data["pal"]["answer"] == 42
    assert events[-1].text == "42"


def test_the_served_model_passes_through(settings: Settings) -> None:
    model = ScriptedChatModel(["hello"])
    request = AgentRequest([{"role": "user", "content": "hi"}], max_tokens=5, stop=["\n"])
    result = run_agent("whatever-is-served", AgentContext(model, settings), request)
    assert result.texts == ["hello"] and model.calls[0].kwargs["stop"] == ["\n"]


def test_agents_that_need_an_index_or_a_question_say_so(settings: Settings) -> None:
    context = AgentContext(ScriptedChatModel(["x"]), settings)
    with pytest.raises(AgentkitError, match="needs an index"):
        run_agent("agentkit-rag", context, AgentRequest.ask("q"))
    with pytest.raises(AgentkitError, match="user message"):
        run_agent("agentkit-pal", context, AgentRequest([{"role": "system", "content": "s"}]))


def test_users_register_their_own_agents(settings: Settings) -> None:
    def shout(context: AgentContext, request: AgentRequest) -> AgentResult:
        return AgentResult([request.question.upper()])

    register_agent(AgentSpec("shout", shout, description="upper case"))
    try:
        assert "shout" in agent_names()
        events = list(stream_agent("shout", AgentContext(ScriptedChatModel([]), settings),
                                   AgentRequest.ask("hey")))  # fmt: skip
        assert [e.text for e in events] == ["HEY"]
    finally:
        from agentkit import agents

        agents._REGISTRY.pop("shout")
