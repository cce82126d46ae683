"""One agent runner behind every front end: agents by name, one result, one event stream.

    context = AgentContext(model, settings, index=index)
    result = run_agent("agentkit-rag", context, AgentRequest.ask("Where does the index live?"))
    result.text, result.data["citations"]
    for event in stream_agent("agentkit-react", context, request):
        event.text, event.data, event.usage

The CLI, the REST API (plain and SSE), ``agentkit chat`` and later front ends look agents up
here and render their events; none of them builds an agent itself, so every setting reaches
every entry point. A name that is not registered passes through to the served model.
``register_agent`` adds your own (it then appears in ``/v1/models``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agentkit.errors import AgentkitError
from agentkit.llm import ChatModel, Message, Usage
from agentkit.settings import Settings


@dataclass
class AgentRequest:
    """What a front end asks of an agent: the chat so far and the generation options."""

    messages: list[Message]
    max_tokens: int | None = None
    temperature: float | None = None
    stop: list[str] | None = None
    n: int = 1
    cancel: threading.Event | None = None  # set it when the client goes away

    @classmethod
    def ask(cls, question: str, **options: Any) -> AgentRequest:
        return cls([{"role": "user", "content": question}], **options)

    @property
    def question(self) -> str:
        """The last user message: what the agents answer."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


@dataclass
class AgentEvent:
    """One piece of a streamed run: answer text, structured data (citations, a step, the PAL
    program), or the usage, which comes last."""

    text: str = ""
    data: dict[str, Any] | None = None
    usage: Usage | None = None


@dataclass
class AgentResult:
    """A finished run: the answer(s), the structured data the API sends as ``agentkit``, usage,
    and the agent's own result object (``Answer``, ``PALAnswer``, ``Trajectory``, …)."""

    texts: list[str]
    data: dict[str, Any] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    detail: Any = None

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""


@dataclass
class AgentContext:
    """What agents are built from: the model, the settings, and the index and sandbox if any."""

    model: ChatModel
    settings: Settings
    index: Any = None  # agentkit.retrievers.Index
    sandbox: Any = None  # agentkit.tools.sandbox.Sandbox; PAL makes one when None
    guardrails: Any = None  # agentkit.guardrails.Guardrails: moderation, revision, best-of-n
    mcp: list[Any] | None = None  # open MCPConnections; None: settings.mcp_servers, on first use

    def mcp_connections(self) -> list[Any]:
        """The MCP servers agentkit-react may use: connected on first use, then reused."""
        if self.mcp is None:
            with _MCP_LOCK:
                if self.mcp is None:
                    from agentkit.mcp_client import open_servers

                    self.mcp = open_servers(self.settings.mcp_servers)
        return self.mcp


_MCP_LOCK = threading.Lock()


Runner = Callable[[AgentContext, AgentRequest], AgentResult]
Streamer = Callable[[AgentContext, AgentRequest], Iterator[AgentEvent]]


@dataclass(frozen=True)
class AgentSpec:
    """A registered agent. Without ``stream`` its run is sent as one event at the end."""

    name: str
    run: Runner
    stream: Streamer | None = None
    needs_index: bool = False
    description: str = ""


_REGISTRY: dict[str, AgentSpec] = {}


def register_agent(spec: AgentSpec) -> AgentSpec:
    """Add (or replace) an agent by its name."""
    if not spec.name or spec.name != spec.name.strip():
        raise AgentkitError("an agent needs a name without surrounding spaces")
    _REGISTRY[spec.name] = spec
    return spec


def agent_names() -> list[str]:
    return list(_REGISTRY)


def get_agent(name: str) -> AgentSpec:
    """The agent called ``name``; any other name passes through to the served model."""
    return _REGISTRY.get(name, PASS_THROUGH)


def check_agent(name: str, context: AgentContext, request: AgentRequest) -> AgentSpec:
    """The agent, after the checks every front end needs before it starts (clear 4xx-type
    errors, raised before anything streams)."""
    spec = get_agent(name)
    if spec is not PASS_THROUGH and not request.question.strip():
        raise AgentkitError("the messages must include a user message with the question")
    if spec.needs_index and context.index is None:
        raise AgentkitError(f"{name} needs an index: index a folder and pass --index")
    return spec


def run_agent(name: str, context: AgentContext, request: AgentRequest) -> AgentResult:
    spec = check_agent(name, context, request)
    if context.guardrails is not None:
        from agentkit.guardrails import guarded_run

        return guarded_run(spec, context, request)
    return spec.run(context, request)


def stream_agent(name: str, context: AgentContext, request: AgentRequest) -> Iterator[AgentEvent]:
    spec = check_agent(name, context, request)
    if context.guardrails is not None:
        from agentkit.guardrails import guarded_stream

        return guarded_stream(spec, context, request)
    return stream_spec(spec, context, request)


def stream_spec(
    spec: AgentSpec, context: AgentContext, request: AgentRequest
) -> Iterator[AgentEvent]:
    """The events of ``spec``'s run (its own stream, or its whole run as one event)."""
    if spec.stream is not None:
        return spec.stream(context, request)
    return _whole(spec, context, request)


def _whole(spec: AgentSpec, context: AgentContext, request: AgentRequest) -> Iterator[AgentEvent]:
    result = spec.run(context, request)
    if result.data:
        yield AgentEvent(data=result.data)
    yield AgentEvent(text=result.text, usage=result.usage)


# --- the built-in agents ---------------------------------------------------------------------


def _rag(context: AgentContext, request: AgentRequest) -> Any:
    from agentkit.rag import RAG

    rag = RAG.from_settings(
        context.index, context.model, context.settings, max_tokens=request.max_tokens
    )
    if request.temperature is not None:
        rag.temperature = request.temperature
    return rag


def _rag_data(answer: Any) -> dict[str, Any]:
    return {
        "citations": [c.to_dict() for c in answer.citations],
        "invalid_citations": answer.invalid_citations,
        "answered": answer.answered,
    }


def run_rag(context: AgentContext, request: AgentRequest) -> AgentResult:
    answer = _rag(context, request).ask(request.question)
    return AgentResult([answer.text], _rag_data(answer), answer.usage, answer)


def stream_rag(context: AgentContext, request: AgentRequest) -> Iterator[AgentEvent]:
    from agentkit.rag import Answer

    for item in _rag(context, request).stream(request.question):
        if isinstance(item, Answer):
            yield AgentEvent(data=_rag_data(item), usage=item.usage)
        else:
            yield AgentEvent(text=item)


def run_pal(context: AgentContext, request: AgentRequest) -> AgentResult:
    from agentkit.pal import PAL

    pal = PAL(context.model, context.sandbox, temperature=request.temperature)
    solved = pal.solve(request.question, cancel=request.cancel)
    text = solved.text or (solved.result.error or "")
    return AgentResult([text], {"pal": solved.to_dict()}, solved.usage, solved)


def run_react(context: AgentContext, request: AgentRequest) -> AgentResult:
    from agentkit.react import ReAct

    agent = ReAct(context.model, index=context.index, mcp_servers=context.mcp_connections())
    trajectory = agent.run(request.question, request.cancel)
    return AgentResult([trajectory.answer], {"react": trajectory.to_dict()}, trajectory.usage,
                       trajectory)  # fmt: skip


def stream_react(context: AgentContext, request: AgentRequest) -> Iterator[AgentEvent]:
    from agentkit.react import ReAct, Step

    agent = ReAct(context.model, index=context.index, mcp_servers=context.mcp_connections())
    for item in agent.steps(request.question, request.cancel):
        if isinstance(item, Step):
            yield AgentEvent(data={"step": item.to_dict()})
        else:  # the trajectory: its steps went out one by one, the rest (fallback, ...) now
            summary = {k: v for k, v in item.to_dict().items() if k != "steps"}
            yield AgentEvent(text=item.answer, data={"react": summary}, usage=item.usage)


def run_model(context: AgentContext, request: AgentRequest) -> AgentResult:
    done = context.model.complete(
        request.messages,
        stop=request.stop,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        n=request.n,
    )
    return AgentResult(done.texts, {}, done.usage, done)


def stream_model(context: AgentContext, request: AgentRequest) -> Iterator[AgentEvent]:
    for delta in context.model.stream(
        request.messages,
        stop=request.stop,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
    ):
        if delta.text or delta.usage is not None:
            yield AgentEvent(text=delta.text, usage=delta.usage)


PASS_THROUGH = AgentSpec("", run_model, stream_model, description="the served model as it is")
register_agent(
    AgentSpec("agentkit-rag", run_rag, stream_rag, True, "answers from the index, citing [n]")
)
register_agent(AgentSpec("agentkit-pal", run_pal, None, False, "writes and runs a program"))
register_agent(
    AgentSpec("agentkit-react", run_react, stream_react, True, "search/lookup/finish steps")
)
