"""ReAct agents (Yao et al. 2022): Thought → Action → Observation until ``finish[answer]``.

    result = ReAct(model, index=index).run("Where was the leader of the raid from?")
    result.answer, [(s.action, s.argument) for s in result.steps]

Each step is generated with a stop at ``Observation`` and, when ``structured`` is on (vLLM),
constrained by a regex to ``Thought: …\\nAction: tool[arg]`` with a registered tool name, so a
step always parses. Without it a tolerant parser reads the step, and a step it cannot read
becomes an observation that teaches the format. Repeating the previous action is answered
with an observation, not run again; at the step limit the agent falls back to a RAG answer.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agentkit import tracing
from agentkit.errors import AgentkitError
from agentkit.llm import ChatModel, Message, Structured, ToolCall, Usage
from agentkit.prompts import load_messages
from agentkit.retrievers import Index
from agentkit.tools.docs import DocumentExplorer, finish
from agentkit.tools.registry import Tool, ToolRegistry

THOUGHT = re.compile(r"thought\s*\d*\s*:\s*(.*?)(?=\n\s*action\b|\Z)", re.I | re.S)
ACTION = re.compile(r"action\s*\d*\s*:\s*([A-Za-z_]\w*)[ \t]*(.*)", re.I | re.S)
BARE_ACTION = re.compile(r"^\s*([A-Za-z_]\w*)\[(.*)\]\s*$", re.M)
MAX_OBSERVATION_CHARS = 1500


@dataclass
class Step:
    thought: str
    action: str | None
    argument: str
    observation: str
    raw: str
    parse_failed: bool = False
    tool_error: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "thought": self.thought,
            "action": self.action,
            "argument": self.argument,
            "observation": self.observation,
            "parse_failed": self.parse_failed,
            "tool_error": self.tool_error,
            "seconds": self.seconds,
        }


@dataclass
class Trajectory:
    question: str
    steps: list[Step] = field(default_factory=list)
    answer: str = ""
    finished: bool = False  # finish[...] was called
    fallback: bool = False  # the step limit was hit and RAG answered
    cancelled: bool = False  # stopped by its cancel event (the client went away)
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0

    @property
    def parse_failures(self) -> int:
        return sum(s.parse_failed for s in self.steps)

    @property
    def tool_errors(self) -> int:
        return sum(s.tool_error for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "finished": self.finished,
            "fallback": self.fallback,
            "cancelled": self.cancelled,
            "parse_failures": self.parse_failures,
            "tool_errors": self.tool_errors,
            "seconds": self.seconds,
            "steps": [s.to_dict() for s in self.steps],
        }


def parse_step(text: str) -> tuple[str, str, str] | None:
    """(thought, tool name, argument) from a step, tolerating case, spacing, missing brackets."""
    thought = THOUGHT.search(text)
    action = ACTION.search(text)
    if action is not None:
        name, rest = action.group(1), action.group(2).strip().split("\n")[0].strip()
        if rest.startswith("["):
            rest = rest[1:].rsplit("]", 1)[0] if "]" in rest else rest[1:]
        elif rest.startswith("(") and rest.endswith(")"):
            rest = rest[1:-1]
    elif (bare := BARE_ACTION.search(text)) is not None:
        name, rest = bare.group(1), bare.group(2)
    else:
        return None
    return (thought.group(1).strip() if thought else ""), name, rest.strip().strip("\"'")


def tool_call_from_text(text: str, names: Iterable[str]) -> ToolCall | None:
    """A call written into the content as JSON ({"name", "arguments"}, fenced or in
    <tool_call> tags) that the server's tool-call parser missed: small models do this."""
    match = re.search(r"\{.*\}", text, re.S)
    if match is None:
        return None
    try:
        data = json.loads(match.group(0))
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in set(names):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    return ToolCall(
        "call_from_text", data["name"], args if isinstance(args, str) else json.dumps(args)
    )


def step_regex(names: Iterable[str]) -> str:
    """Every step as the server must write it (``+`` not ``{1,200}``: xgrammar times out)."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"Thought: [^\n\[\]]+\nAction: ({alternatives})\[[^\n\[\]]+\]"


REPEATED = "You just did"


@dataclass
class Draft:
    """A producer's next step, before anything runs: ``name`` is None when it did not parse."""

    thought: str
    name: str | None
    argument: str  # as shown and compared for repeats
    call_with: Any  # what the tool is called with (the text, or the call's JSON arguments)
    raw: str
    usage: Usage
    invalid: str = ""  # the observation for a step that names no known tool


class ReAct:
    """A ReAct agent over ``search``/``lookup``/``finish`` on an index, plus any tools given."""

    def __init__(
        self,
        model: ChatModel,
        tools: Iterable[Tool | Callable[..., Any]] = (),
        index: Index | None = None,
        *,
        max_steps: int = 8,
        structured: bool = True,
        max_tokens: int = 160,
        prompt: str = "react_hotpotqa",
        on_step: Callable[[Step], None] | None = None,
        mode: str = "text",
        mcp_servers: Iterable[Any] = (),
    ) -> None:
        """``mode="tools"``: OpenAI-style tool calling instead of the Thought/Action text.

        ``mcp_servers``: MCP servers whose tools the agent may call, each a command (stdio), a
        URL (streamable HTTP), an ``MCPServerSpec`` or an open ``MCPConnection``. Those given as
        specs are connected now and kept open for every question, until ``close()``.
        """
        self.model, self.index, self.max_steps = model, index, max_steps
        self.extra_tools = list(tools)
        self.structured, self.max_tokens, self.prompt, self.on_step = (
            structured,
            max_tokens,
            prompt,
            on_step,
        )
        if max_steps < 1:
            raise AgentkitError("max_steps must be at least 1")
        if mode not in ("text", "tools"):
            raise AgentkitError(f"mode must be text or tools, not {mode!r}")
        if mode == "tools" and not hasattr(model, "complete_tools"):
            raise AgentkitError("mode='tools' needs a model with complete_tools (OpenAIChatModel)")
        self.mode = mode
        self.mcp_connections: list[Any] = []
        self._owned: list[Any] = []
        servers = list(mcp_servers)
        if servers:
            from agentkit.mcp_client import MCPConnection, open_servers

            self.mcp_connections = open_servers(servers)
            self._owned = [
                c for c, given in zip(self.mcp_connections, servers)
                if not isinstance(given, MCPConnection)
            ]  # fmt: skip

    def close(self) -> None:
        """Close the MCP connections this agent opened (those passed in open stay open)."""
        for connection in self._owned:
            connection.close()
        self._owned = []

    def __enter__(self) -> ReAct:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _registry(self) -> ToolRegistry:
        registry = ToolRegistry()
        if self.index is not None:
            for t in DocumentExplorer(self.index).tools():
                registry.register(t)
        elif not any(getattr(t, "name", None) == "finish" for t in self.extra_tools):
            registry.register(finish)
        for t in self.extra_tools:
            registry.register(t)
        if self.mcp_connections:
            from agentkit.mcp_client import mcp_tools

            for t in mcp_tools(self.mcp_connections, taken=registry.names()):
                registry.register(t)
        return registry

    def steps(
        self, question: str, cancel: threading.Event | None = None
    ) -> Iterator[Step | Trajectory]:
        """Yields each Step as it happens, then the Trajectory. Setting ``cancel`` (the client
        went away) stops before the next step, with no fallback: ``cancelled`` says so.

        The one loop of every mode: the mode's producer only drafts the next step (and records
        the observation in its messages); running tools, repeats, the re-draw of a stuck agent,
        usage, finish and the fallback happen here, alike for text and tool calls.
        """
        started = time.perf_counter()
        run = tracing.agent_span("agentkit-react", question, current=False)
        traced = run.context()  # made current around the work between yields, never across one
        try:
            with tracing.use_context(traced):
                registry = self._registry()
                producer_type = ToolCallSteps if self.mode == "tools" else TextSteps
                producer = producer_type(self, question, registry)
            result = Trajectory(question)
            previous: tuple[str, str] | None = None
            repeats = 0
            for index in range(self.max_steps):
                if cancel is not None and cancel.is_set():
                    result.cancelled = True
                    break
                with (
                    tracing.use_context(traced),
                    tracing.span("react_step", {"agentkit.step.index": index}) as step_span,
                ):
                    step, draft = self._step(producer, registry, previous, repeats, result)
                    step_span.set("agentkit.step.action", step.action)
                    step_span.set("agentkit.step.parse_failed", step.parse_failed)
                    step_span.set("agentkit.step.tool_error", step.tool_error)
                if step.observation.startswith(REPEATED):
                    repeats += 1
                elif not step.parse_failed:
                    repeats = 0
                if draft.name is not None and not step.parse_failed:
                    previous = (draft.name, draft.argument.casefold())
                result.steps.append(step)
                if self.on_step:
                    self.on_step(step)
                yield step
                if step.action == "finish" and not step.parse_failed:
                    result.answer, result.finished = step.argument, True
                    break
                if repeats >= 3:  # stuck: more steps will not help, the fallback might
                    break
                producer.observe(draft, step.observation)
            if not result.finished and not result.cancelled:
                with tracing.use_context(traced):
                    result.fallback, result.answer = True, self._fallback(question)
            result.seconds = time.perf_counter() - started
            run.set("agentkit.react.steps", len(result.steps))
            run.set("agentkit.react.finished", result.finished)
            run.set("agentkit.react.fallback", result.fallback)
            run.set("gen_ai.usage.input_tokens", result.usage.prompt_tokens)
            run.set("gen_ai.usage.output_tokens", result.usage.completion_tokens)
        except BaseException as error:
            run.__exit__(type(error), error, None)
            raise
        run.end()
        yield result

    def _step(
        self,
        producer: TextSteps | ToolCallSteps,
        registry: ToolRegistry,
        previous: tuple[str, str] | None,
        repeats: int,
        result: Trajectory,
    ) -> tuple[Step, Draft]:
        """Draft the next step and run it; the draft's usage goes into ``result``."""
        t0 = time.perf_counter()
        # greedy decoding repeats itself: after a repeat, sample. A sampled step can run past
        # max_tokens before its action (the regex cannot bound it: xgrammar times out on
        # {m,n}); such a step is drawn again, greedily, before it counts as a failure.
        for temperature in [0.7, 0.0] if repeats else [0.0]:
            draft = producer.draft(temperature)
            result.usage += draft.usage
            if draft.name is not None:
                break
        t1 = time.perf_counter()
        step = self._act(draft, registry, previous)
        step.seconds = {"generate": t1 - t0, "tool": time.perf_counter() - t1}
        return step, draft

    @staticmethod
    def _act(draft: Draft, registry: ToolRegistry, previous: tuple[str, str] | None) -> Step:
        """The step for ``draft``: its tool's observation, or why it did not run."""
        tool = registry.get(draft.name) if draft.name is not None else None
        step = Step(draft.thought, draft.name, draft.argument, "", draft.raw)
        if tool is None:
            step.parse_failed, step.observation = True, draft.invalid
        elif tool.name == "finish":
            step.observation = draft.argument
        elif previous == (tool.name, draft.argument.casefold()):
            step.observation = (
                f"{REPEATED} {tool.name}[{draft.argument}]; its result is above."
                " Do something else or finish[answer]."
            )
        else:
            attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool.name}
            with tracing.span(f"execute_tool {tool.name}", attributes) as tool_span:
                if tracing.capture_content():
                    tool_span.set("gen_ai.tool.call.arguments", draft.argument)
                try:
                    step.observation = str(tool(draft.call_with))[:MAX_OBSERVATION_CHARS]
                except Exception as error:  # a tool's failure is the model's observation
                    step.observation, step.tool_error = f"Error from {tool.name}: {error}", True
                    tool_span.set("error.type", type(error).__qualname__)
        return step

    def _fallback(self, question: str) -> str:
        if self.index is None:
            return ""
        from agentkit.rag import RAG

        return RAG(self.index, self.model, max_tokens=80).ask(question).text

    def run(self, question: str, cancel: threading.Event | None = None) -> Trajectory:
        for item in self.steps(question, cancel):
            if isinstance(item, Trajectory):
                return item
        raise AssertionError("unreachable")


class TextSteps:
    """Drafts ``Thought: …`` / ``Action: tool[arg]`` steps, regex-constrained when structured."""

    def __init__(self, agent: ReAct, question: str, registry: ToolRegistry) -> None:
        self.agent, self.registry = agent, registry
        self.messages: list[Message] = load_messages(
            agent.prompt, question=question, tools=registry.describe()
        )
        self.constraint = (
            Structured(regex=step_regex(registry.names())) if agent.structured else None
        )

    def draft(self, temperature: float) -> Draft:
        completion = tracing.complete(
            self.agent.model,
            self.messages,
            stop=["\nObservation"],
            max_tokens=self.agent.max_tokens,
            temperature=temperature,
            structured=self.constraint,
        )
        raw = completion.text.strip()
        invalid = (
            "Invalid step. Write two lines: 'Thought: ...' then 'Action: tool[argument]' with "
            f"tool one of {self.registry.names()}."
        )
        parsed = parse_step(raw)
        if parsed is None:
            return Draft("", None, "", "", raw, completion.usage, invalid)
        thought, name, argument = parsed
        return Draft(thought, name, argument, argument, raw, completion.usage, invalid)

    def observe(self, draft: Draft, observation: str) -> None:
        self.messages = [
            *self.messages,
            {"role": "assistant", "content": draft.raw},
            {"role": "user", "content": f"Observation: {observation}"},
        ]


class ToolCallSteps:
    """Drafts steps from the model's native tool calls (vLLM: a ``--tool-call-parser``); an
    answer in words is ``finish``."""

    def __init__(self, agent: ReAct, question: str, registry: ToolRegistry) -> None:
        self.agent, self.registry = agent, registry
        self.messages: list[Any] = load_messages("react_tools", question=question)
        self.schemas = [t.openai_schema() for t in registry]
        self.call: ToolCall | None = None

    def draft(self, temperature: float) -> Draft:
        completion = tracing.complete(
            self.agent.model,
            self.messages,
            tools=self.schemas,
            max_tokens=self.agent.max_tokens,
            temperature=temperature,
        )
        text = completion.text.strip()
        recovered = tool_call_from_text(completion.text, self.registry.names())
        calls = completion.tool_calls or ([recovered] if recovered else [])
        if not calls:
            self.call = None
            return Draft("", "finish", text, text, "", completion.usage)
        call = self.call = calls[0]
        try:
            args: Any = json.loads(call.arguments or "{}")
        except ValueError:
            args = call.arguments
        argument = str(next(iter(args.values()), "")) if isinstance(args, dict) else str(args)
        invalid = f"No tool {call.name}; tools: {self.registry.names()}"
        return Draft(text, call.name, argument, args, call.arguments, completion.usage, invalid)

    def observe(self, draft: Draft, observation: str) -> None:
        call = self.call
        if call is None:
            return
        self.messages += [
            {
                "role": "assistant",
                "content": draft.thought or None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": observation},
        ]
