"""OpenAI's chat completions over the agents (plain and SSE), and the models list.

A request's checks and its agent's run happen in a worker thread (``ChatTurn.completion`` or
``ChatTurn.events``); the SSE framing on the event loop (``ChatTurn.sse``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from agentkit.agents import (
    PASS_THROUGH,
    AgentContext,
    AgentEvent,
    AgentRequest,
    agent_names,
    get_agent,
    run_agent,
    stream_agent,
)
from agentkit.budget import token_upper_bound
from agentkit.constitution import load_constitution
from agentkit.critique import Critic
from agentkit.errors import AgentkitError, ContextBudgetError
from agentkit.guardrails import Guardrails
from agentkit.llm import ChatModel, Usage
from agentkit.prompts import load_messages
from agentkit.services.api_state import ApiState
from agentkit.services.auth import AUTHORIZED, Caller
from agentkit.services.conversations import trim_to_budget
from agentkit.services.lifecycle import ServerStopping
from agentkit.services.schemas import SSE_EVENT, ChatRequest, errors
from agentkit.services.streaming import (
    CHAT_WORKERS,
    END,
    BackgroundIterator,
    ChunkFrames,
    ClientGone,
    disconnected,
    error_event,
)
from agentkit.sse import DONE

CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A chat completion, or with `stream: true` server-sent events in "
        "OpenAI's chunk format, ending with `data: [DONE]`. An error after the first "
        'event arrives as an event `{"error": {...}}`, then `data: [DONE]`.',
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    },
    **errors(400, 401, 404, 413, 429, 502, 503),
}


class ChatTurn:
    """One chat request: its checks and its agent's run happen in a worker thread
    (``completion`` or ``events``), its SSE framing on the event loop (``sse``)."""

    def __init__(self, state: ApiState, body: ChatRequest, caller: Caller) -> None:
        self.state, self.body, self.caller = state, body, caller
        self.agent = get_agent(body.model)
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.usage = Usage()  # a stream's, added up as the model reports it
        self.cancel = threading.Event()  # set when the client goes away or time is up
        self.context = guarded_context(state, body)

    def prepare(self) -> tuple[AgentRequest, Callable[[str, dict[str, Any]], None] | None]:
        """The checks that need the model or the stores (the model's name, the conversation,
        the context), then the agent's request and what remembers the reply once the client
        has it."""
        body, model, conversations = self.body, self.state.model, self.state.conversations
        passes_through = self.agent is PASS_THROUGH
        if passes_through and (served := served_model(model)) not in (None, body.model):
            adapters = lora_adapters(model)
            if body.model not in adapters:
                names = ", ".join((*agent_names(), served, *adapters))
                raise HTTPException(404, f"no model {body.model!r} here; use one of {names}")
            # a LoRA adapter of the served model: the same servers, asked for the adapter
            model = model.with_model(body.model)  # type: ignore[attr-defined]
            self.context = replace(self.context, model=model)
        new_messages = [m.model_dump() for m in body.messages]
        messages, remember = new_messages, None
        if body.conversation_id and conversations is not None:
            # Another key's conversation is ConversationNotFound (404), for admins too: a
            # conversation is private to the key that started it.
            owner, conversation = self.caller.owner, body.conversation_id
            history = conversations.history(conversation, owner=owner)
            messages = trim_to_budget(model, history, new_messages, body.max_tokens or 256)

            def remember(text: str, data: dict[str, Any]) -> None:
                if not self.cancel.is_set():
                    reply = {"role": "assistant", "content": text, "agent": body.model}
                    if data:
                        reply["agentkit"] = data
                    conversations.append(conversation, [*new_messages, reply], owner=owner)

        request = AgentRequest(
            messages,  # type: ignore[arg-type]
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            stop=stops(body.stop),
            n=body.n,
            cancel=self.cancel,
        )
        if passes_through:
            check_context(model, messages, body.max_tokens)
        elif self.agent.name == "agentkit-pal":
            from agentkit.pal import PAL

            pal = PAL(model, self.state.sandbox)
            prompt = load_messages(pal.prompt, question=request.question)
            check_context(model, prompt, pal.max_tokens)
        return request, remember

    def completion(self) -> Iterator[dict[str, Any]]:
        """The chat.completion (one item)."""
        body, metrics = self.body, self.state.metrics
        request, remember = self.prepare()
        result = run_agent(body.model, self.context, request)
        metrics.count_tokens(result.usage)
        metrics.count_data(result.data)
        data = result.data
        if remember is not None:
            remember(result.text, data)
            data = {**data, "conversation_id": body.conversation_id}
        yield {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": body.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
                for i, text in enumerate(result.texts)
            ],
            "usage": openai_usage(result.usage),
            **({"agentkit": data} if data else {}),
        }

    def events(self) -> Iterator[AgentEvent]:
        """The agent's events; the reply is remembered once it is whole."""
        metrics = self.state.metrics
        request, remember = self.prepare()
        parts: list[str] = []
        shown: dict[str, Any] = {}  # what the events showed, kept with the reply
        try:
            for event in stream_agent(self.body.model, self.context, request):
                if event.usage is not None:
                    self.usage += event.usage
                metrics.count_data(event.data)
                parts.append(event.text)
                keep_shown(shown, event.data)
                yield event
        finally:
            metrics.count_tokens(self.usage)
        if remember is not None:
            remember("".join(parts), shown)

    async def sse(self, first: Any, work: BackgroundIterator) -> AsyncIterator[str]:
        """OpenAI's chunk framing: a role chunk, content chunks, a finish chunk, ``[DONE]``;
        with ``stream_options.include_usage``, a chunk with no choices and the usage last.
        An error, or the end of the server's grace period, ends the stream with an error event
        and ``[DONE]``; a client that goes away stops the work."""
        options = self.body.stream_options
        frames = ChunkFrames(self.id, self.created, self.body.model)
        try:
            yield frames.chunk({"role": "assistant", "content": ""}, None)
            async with work.interrupted((self.state.stopping.ended, ServerStopping())):
                event = first
                while event is not END:
                    if event.text or event.data:
                        delta = {"content": event.text} if event.text else {}
                        yield frames.chunk(delta, None, event.data)
                    event = await work.next()
            yield frames.chunk({}, "stop")
            if options is not None and options.include_usage:
                yield frames.frame(choices=[], usage=openai_usage(self.usage))
        except Exception as error:  # the response has started: its status is sent
            yield error_event(error, self.state.relative)
        finally:
            work.stop()
        yield f"data: {DONE}\n\n"


def chat_router(state: ApiState) -> APIRouter:
    router = APIRouter()
    chat_slots = threading.BoundedSemaphore(CHAT_WORKERS)
    stopping = state.stopping

    @router.get("/v1/models", responses=errors(401, 429))
    def models(_: Caller = AUTHORIZED) -> dict[str, Any]:
        names = agent_names()
        try:
            names.append(getattr(state.model, "model", "model"))
        except AgentkitError:
            pass
        names.extend(lora_adapters(state.model))
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "agentkit"} for n in names
            ],
        }

    @router.post("/v1/chat/completions", responses=CHAT_RESPONSES)
    async def chat(body: ChatRequest, request: Request, caller: Caller = AUTHORIZED) -> Any:
        """Whatever the request would be refused for is refused before a stream starts, with
        the status the same request gets unstreamed."""
        turn = ChatTurn(state, body, caller)
        question = next((m.content for m in reversed(body.messages) if m.role == "user"), "")
        if turn.agent is not PASS_THROUGH and not question.strip():
            raise HTTPException(400, "messages must include a user message with the question")
        if turn.agent.needs_index and state.index is None:
            raise HTTPException(400, f"{body.model} needs an index: start the API with --index")
        if stopping.started:
            raise ServerStopping()
        work = BackgroundIterator(
            turn.events if body.stream else turn.completion, turn.cancel, chat_slots
        )
        # Until the first event, the request can still fail with an HTTP status: by then the
        # model's name, the conversation, the context budget and the retrieval are checked.
        async with work.interrupted(
            (partial(disconnected, request.receive), ClientGone()),
            (stopping.ended, ServerStopping()),
        ):
            first = await work.next()
        if not body.stream:
            return first
        return StreamingResponse(
            turn.sse(first, work),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router


def lora_adapters(model: ChatModel) -> tuple[str, ...]:
    """The LoRA adapters the model's server lists (``agentkit model serve --lora``), if it
    says."""
    adapters = getattr(model, "adapters", None)
    try:
        return tuple(adapters()) if callable(adapters) else ()
    except AgentkitError:
        return ()


def guarded_context(state: ApiState, body: ChatRequest) -> AgentContext:
    """The agents' context for one request: the server's guardrails (which a request cannot
    turn off), with the request's ``best_of`` and ``revise`` on top."""
    context = state.context
    if not body.best_of and not body.revise:
        return context
    if (body.best_of or 1) > 1 and body.n > 1:
        raise HTTPException(400, "best_of returns one answer: leave n at 1")
    rails = context.guardrails or Guardrails(
        critic=Critic(context.model, load_constitution(state.settings.constitution))
    )
    chosen = rails.with_options(
        best_of=body.best_of or rails.best_of, revise=body.revise or rails.revise_all
    )
    return replace(context, guardrails=chosen)


def keep_shown(shown: dict[str, Any], data: dict[str, Any] | None) -> None:
    """Add an event's data to what a streamed answer showed: ReAct's steps one after another,
    anything else (citations, the PAL program, the ReAct summary) as last sent."""
    for key, value in (data or {}).items():
        if key == "step":
            shown.setdefault("steps", []).append(value)
        else:
            shown[key] = value


def served_model(model: ChatModel) -> str | None:
    """The name of the model passed through to, when the model says it (a server does)."""
    name = getattr(model, "model", None)
    return name if isinstance(name, str) else None


def check_context(model: ChatModel, messages: list[dict[str, str]], max_tokens: int | None) -> None:
    """ContextBudgetError (a 400) when ``messages`` and ``max_tokens`` more (at least one)
    cannot fit the model's context; the server would refuse them too, after the stream began."""
    context = model.context_length()
    room = max_tokens or 1
    if token_upper_bound(messages) + room <= context:  # no round trip to count them
        return
    used = model.count_tokens(messages)
    if used + room > context:
        asked = f" and max_tokens asks for {max_tokens} more" if max_tokens else ""
        raise ContextBudgetError(
            f"the messages take {used} of the model's {context} tokens of context{asked}: "
            "shorten them, ask for fewer tokens, or serve the model with a larger --max-model-len"
        )


def openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def stops(stop: str | list[str] | None) -> list[str] | None:
    return [stop] if isinstance(stop, str) else stop
