"""The model client: one ``ChatModel`` protocol and its httpx implementation.

``OpenAIChatModel`` talks to any OpenAI-compatible server (vLLM first of all): chat completions,
streaming over SSE, vLLM's structured outputs, ``/tokenize`` for exact prompt sizes and
``max_model_len`` for the context. Generation options travel as one ``ModelSettings`` (or as
keyword arguments). Connection errors, timeouts, 429 and 5xx are retried with exponential backoff
(spreading over replicas when several URLs are given): ``_attempts`` is that loop, written once,
and the sync, async, plain and streaming requests only do the I/O of each attempt. Every other
failure becomes an ``LLMError``/``ModelServerError`` whose message says what to do.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import httpx

from agentkit import tracing
from agentkit.errors import LLMError, ModelServerError
from agentkit.sse import aiter_events, iter_events

Message = Mapping[str, str]
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
START_HINT = "start one with `agentkit model serve` or set AGENTKIT_LLM_URL"
CHAT = "/v1/chat/completions"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Structured:
    """vLLM structured outputs: exactly one of a regex, a JSON schema, a choice or a grammar.

    Sent as ``structured_outputs``, which vLLM reads from 0.10.2 on (the ``guided_*`` fields it
    replaced are gone since 0.12). Older servers ignore it, so callers parse tolerantly anyway; a
    server that refuses it as an unknown field gets the request again without it.
    """

    regex: str | None = None
    json_schema: dict[str, Any] | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None

    def to_request(self) -> dict[str, Any]:
        given = {
            "regex": self.regex,
            "json": self.json_schema,
            "choice": list(self.choice) if self.choice is not None else None,
            "grammar": self.grammar,
        }
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) != 1:
            raise LLMError("Structured takes exactly one of regex, json_schema, choice, grammar")
        return given


@dataclass(frozen=True)
class ModelSettings:
    """Generation options for one call, in one object; ``None`` leaves the server's default.

    Every ``ChatModel`` method takes one, and the same names as keyword arguments
    (``model.complete(messages, max_tokens=64)``), which win over it when not ``None``.
    """

    max_tokens: int | None = None
    temperature: float | None = None
    stop: Sequence[str] | None = None
    n: int = 1  # choices; a stream has one
    structured: Structured | None = None

    @classmethod
    def of(
        cls, settings: ModelSettings | None, options: Mapping[str, Any], *, stream: bool = False
    ) -> ModelSettings:
        """``settings`` with the keyword ``options`` a call was given (unknown names: TypeError)."""
        chosen = replace(settings or cls(), **{k: v for k, v in options.items() if v is not None})
        if stream and chosen.n != 1:
            raise LLMError(f"a stream gives one choice, not n={chosen.n}: use complete()")
        return chosen

    def to_request(self) -> dict[str, Any]:
        """The OpenAI-compatible request fields these settings set."""
        fields = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stop": list(self.stop) if self.stop else None,
            "n": self.n if self.n != 1 else None,
            "structured_outputs": self.structured.to_request() if self.structured else None,
        }
        return {name: value for name, value in fields.items() if value is not None}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclass
class ToolCall:
    """A function call an OpenAI-style tool-calling model asked for (arguments: JSON text)."""

    id: str
    name: str
    arguments: str


@dataclass
class Completion:
    """A finished completion; ``texts`` has the ``n`` choices, ``text`` the first."""

    texts: list[str]
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    latency_s: float = 0.0
    tool_calls: list[ToolCall] = field(default_factory=list)  # of the first choice

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""


@dataclass
class Delta:
    """One piece of a stream: new text, and at the end the finish reason and usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@runtime_checkable
class ChatModel(Protocol):
    """What agents need from a model. ``OpenAIChatModel`` and ``ScriptedChatModel`` implement it.

    Generation options come as a ``ModelSettings``, as keyword arguments named like its fields
    (``stop``, ``max_tokens``, ``temperature``, ``n``, ``structured``), or both.
    """

    def complete(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> Completion:
        """The ``n`` choices of a reply."""
        ...

    def stream(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> Iterator[Delta]:
        """One reply as it is generated; the last delta carries the finish reason and usage."""
        ...

    async def acomplete(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> Completion: ...

    def astream(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> AsyncIterator[Delta]: ...

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt tokens of ``messages`` after the chat template, generation prompt included."""
        ...

    def context_length(self) -> int:
        """The served model's maximum sequence length (prompt + completion)."""
        ...


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass
class Attempt:
    """One try of a request: where to send which body, after how long a wait. The driver records
    the outcome: the response, or the transport error that ``with attempt:`` catches."""

    url: str
    body: dict[str, Any] | None
    delay_s: float
    outcome: httpx.Response | httpx.TransportError | None = None
    sent: bool = False  # part of a stream reached the caller: a retry would repeat it

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> bool:
        if isinstance(error, httpx.TransportError):
            self.outcome = error
            return True
        return False

    def delta(self, event: dict[str, Any]) -> Delta:
        """A stream event for the caller (so from now on the attempt is not retried)."""
        self.sent = True
        return parse_delta(event)


class OpenAIChatModel:
    """``ChatModel`` over httpx for OpenAI-compatible servers, with retries across replicas."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 300.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        """``extra_body`` is merged into every completion request (e.g. vLLM's ``top_k``)."""
        self.urls = [normalize_url(u) for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls or not all(self.urls):
            raise LLMError(f"no model server URL given: {START_HINT}")
        self.api_key = api_key
        self.extra_body = dict(extra_body or {})
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self._client = httpx.Client(headers=headers, timeout=self.timeout, limits=limits)
        self._aclient: httpx.AsyncClient | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self._headers, self._limits = headers, limits
        self._turn = itertools.count()
        self._model = model
        self._max_model_len: int | None = None
        self._adapters: tuple[str, ...] | None = None  # LoRA adapters the server lists
        self._structured_outputs = True  # False once the server refused the field

    # --- what is served -------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The served model's name: as given, else the first model the server lists."""
        if self._model is None:
            self._load_models()
        assert self._model is not None
        return self._model

    def context_length(self) -> int:
        if self._max_model_len is None:
            self._load_models()
        return self._max_model_len or 4096

    def _load_models(self) -> None:
        data = self._send("GET", "/v1/models").get("data") or []
        if not data:
            raise ModelServerError(f"the model server at {self.urls[0]} serves no model")
        entry = next((d for d in data if d.get("id") == self._model), None)
        if entry is None and self._model is not None:
            served = ", ".join(d.get("id", "?") for d in data)
            raise LLMError(f"model {self._model!r} is not served (served: {served}); fix the name")
        entry = entry or data[0]
        self._model = self._model or entry["id"]
        self._max_model_len = entry.get("max_model_len")
        # vLLM lists each LoRA adapter (--lora-modules) as a model with its base as ``parent``
        self._adapters = tuple(d["id"] for d in data if d.get("parent") and d.get("id"))

    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapters the server serves beside the model (names a request may use)."""
        if self._adapters is None:
            self._load_models()
        return self._adapters or ()

    def with_model(self, name: str) -> OpenAIChatModel:
        """The same servers and connections, asking for the model (or LoRA adapter) ``name``."""
        other = copy.copy(self)
        other._model = name
        return other

    def count_tokens(self, messages: Sequence[Message]) -> int:
        body = {"model": self.model, "messages": list(messages), "add_generation_prompt": True}
        try:
            return int(self._send("POST", "/tokenize", body)["count"])
        except LLMError:  # not vLLM: an estimate that errs on the large side
            return sum(len(m.get("content", "")) // 3 + 8 for m in messages)

    # --- requests -------------------------------------------------------------------------------

    def _body(
        self, messages: Sequence[Any], settings: ModelSettings, stream: bool = False
    ) -> dict[str, Any]:
        body: dict[str, Any] = {**self.extra_body, "model": self.model, "messages": list(messages)}
        body.update(settings.to_request())
        if not self._structured_outputs:
            body.pop("structured_outputs", None)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def _abody(
        self, messages: Sequence[Any], settings: ModelSettings, stream: bool = False
    ) -> dict[str, Any]:
        if self._model is None:  # the name comes from the server, through the sync client
            await asyncio.to_thread(self._load_models)
        return self._body(messages, settings, stream)

    def complete(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> Completion:
        started = time.perf_counter()
        body = self._body(messages, ModelSettings.of(settings, options))
        return parse_completion(self._send("POST", CHAT, body), started)

    def complete_tools(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
        settings: ModelSettings | None = None,
        **options: Any,
    ) -> Completion:
        """A completion that may call ``tools`` (OpenAI schema); vLLM needs a tool-call parser."""
        started = time.perf_counter()
        body = self._body(messages, ModelSettings.of(settings, options))
        body["tools"], body["tool_choice"] = list(tools), "auto"
        return parse_completion(self._send("POST", CHAT, body), started)

    async def acomplete(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> Completion:
        started = time.perf_counter()
        body = await self._abody(messages, ModelSettings.of(settings, options))
        return parse_completion(await self._asend("POST", CHAT, body), started)

    def stream(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> Iterator[Delta]:
        body = self._body(messages, ModelSettings.of(settings, options, stream=True), True)
        for attempt in self._attempts(body):
            time.sleep(attempt.delay_s)
            with (
                attempt,
                self._client.stream(
                    "POST", attempt.url + CHAT, json=attempt.body, headers=tracing.headers()
                ) as r,
            ):
                attempt.outcome = r
                if r.is_error:
                    r.read()  # the server's reason, for the error
                    continue
                for event in iter_events(r.iter_lines()):
                    yield attempt.delta(event)

    async def astream(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> AsyncIterator[Delta]:
        body = await self._abody(messages, ModelSettings.of(settings, options, stream=True), True)
        client = self._async_client()
        for attempt in self._attempts(body):
            await asyncio.sleep(attempt.delay_s)
            with attempt:
                async with client.stream(
                    "POST", attempt.url + CHAT, json=attempt.body, headers=tracing.headers()
                ) as r:
                    attempt.outcome = r
                    if r.is_error:
                        await r.aread()
                        continue
                    async for event in aiter_events(r.aiter_lines()):
                        yield attempt.delta(event)

    # --- transport with retries -----------------------------------------------------------------

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The JSON answer to one plain request, retried."""
        for attempt in self._attempts(body):
            time.sleep(attempt.delay_s)
            with attempt:
                attempt.outcome = self._client.request(
                    method, attempt.url + path, json=attempt.body, headers=tracing.headers()
                )
        return attempt.outcome.json()

    async def _asend(self, method: str, path: str, body: dict[str, Any]) -> Any:
        client = self._async_client()
        for attempt in self._attempts(body):
            await asyncio.sleep(attempt.delay_s)
            with attempt:
                attempt.outcome = await client.request(
                    method, attempt.url + path, json=attempt.body, headers=tracing.headers()
                )
        return attempt.outcome.json()

    def _attempts(self, body: dict[str, Any] | None) -> Iterator[Attempt]:
        """The retry loop of every request, sync or async, plain or streamed, without its I/O.

        Each attempt says where to send what after how long; once the driver has recorded its
        outcome, the loop ends at a good response, tries again, or raises the error that says
        what to do. A server that refuses ``structured_outputs`` gets the request without it.
        """
        retries, delay_s = 0, 0.0
        while True:
            attempt = Attempt(self.urls[next(self._turn) % len(self.urls)], body, delay_s)
            yield attempt
            if body and "structured_outputs" in body and refuses_structured(attempt.outcome):
                body, delay_s = self._without_structured_outputs(attempt), 0.0
                continue
            delay_s = self._retry_delay(retries, attempt)
            if delay_s is None:
                raise_for_outcome(attempt, self.timeout)
                return
            retries += 1

    def _retry_delay(self, retries: int, attempt: Attempt) -> float | None:
        """Seconds to wait before trying again, or ``None`` when the outcome is final: a response
        that is not 408/429/5xx, the last retry spent, or a stream that already sent text."""
        outcome = attempt.outcome
        if retries >= self.max_retries or attempt.sent:
            return None
        if isinstance(outcome, httpx.Response):
            if outcome.status_code not in RETRY_STATUS:
                return None
            retry_after = outcome.headers.get("retry-after", "")
            if retry_after.replace(".", "", 1).isdigit():
                return min(float(retry_after), 30.0)
        return min(self.backoff_s * 2**retries, 8.0)

    def _without_structured_outputs(self, attempt: Attempt) -> dict[str, Any]:
        self._structured_outputs = False
        log.warning(
            "the model server at %s does not know `structured_outputs`: generating without "
            "constraints from now on (vLLM reads it from 0.10.2 on)",
            attempt.url,
        )
        return {k: v for k, v in (attempt.body or {}).items() if k != "structured_outputs"}

    def _async_client(self) -> httpx.AsyncClient:
        """One pooled AsyncClient per event loop (an httpx client cannot cross loops)."""
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            self._aclient = httpx.AsyncClient(
                headers=self._headers, timeout=self.timeout, limits=self._limits
            )
            self._aclient_loop = loop
        return self._aclient

    def close(self) -> None:
        self._client.close()

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None

    def __enter__(self) -> OpenAIChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raise_for_outcome(attempt: Attempt, timeout: httpx.Timeout) -> None:
    """Raise the error for the final outcome of a request; a good response passes."""
    outcome = attempt.outcome
    if isinstance(outcome, httpx.Response):
        check_status(outcome, attempt.url)
    elif attempt.sent:  # a retry would repeat text the caller already has
        raise LLMError(f"the stream from {attempt.url} broke off ({outcome}); retry")
    else:
        raise transport_error(outcome, attempt.url, timeout)  # type: ignore[arg-type]


def refuses_structured(outcome: httpx.Response | httpx.TransportError | None) -> bool:
    """A 400/422 whose reason names ``structured_outputs`` as a field the server does not know.

    vLLM never answers so (before 0.10.2 it ignores the field); strict OpenAI-compatible servers
    and proxies do.
    """
    if not isinstance(outcome, httpx.Response) or outcome.status_code not in (400, 422):
        return False
    reason = outcome.text.lower()
    unknown = ("unrecognized", "unknown", "extra", "not permitted", "not allowed", "unexpected")
    return "structured_outputs" in reason and any(word in reason for word in unknown)


def transport_error(error: httpx.TransportError, url: str, timeout: httpx.Timeout) -> Exception:
    if isinstance(error, httpx.TimeoutException):
        return ModelServerError(
            f"the model server at {url} did not answer within {timeout.read:.0f} s: it may be "
            "overloaded; raise AGENTKIT_LLM_TIMEOUT_S or ask for fewer tokens"
        )
    return ModelServerError(f"no model server at {url} ({type(error).__name__}): {START_HINT}")


def check_status(response: httpx.Response, url: str) -> None:
    """Raise our error for a failed response (a streamed one with its body read)."""
    status = response.status_code
    if status < 400:
        return
    try:
        detail = response.json()
        detail = detail.get("error", detail) if isinstance(detail, dict) else detail
        message = detail.get("message", detail) if isinstance(detail, dict) else detail
    except ValueError:
        message = response.text[:500]
    if status in (401, 403):
        raise LLMError(
            f"the model server at {url} refused the request ({status}): set "
            "AGENTKIT_LLM_API_KEY to a key it accepts"
        )
    if status == 404:
        raise LLMError(
            f"{url}{response.request.url.path} answered 404 ({message}): check the "
            "model name and that the URL points to an OpenAI-compatible server"
        )
    if status in RETRY_STATUS:
        raise ModelServerError(
            f"the model server at {url} kept failing ({status}: {message}); "
            "check its log (agentkit model serve writes one)"
        )
    raise LLMError(f"the model server rejected the request ({status}): {message}")


def parse_completion(data: dict[str, Any], started: float) -> Completion:
    choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
    if not choices:
        raise LLMError(f"the model server returned no choices: {str(data)[:300]}")
    usage = data.get("usage") or {}
    calls = (choices[0].get("message") or {}).get("tool_calls") or []
    return Completion(
        tool_calls=[
            ToolCall(c.get("id", ""), c["function"]["name"], c["function"].get("arguments") or "")
            for c in calls
            if c.get("function", {}).get("name")
        ],
        texts=[(c.get("message") or {}).get("content") or "" for c in choices],
        finish_reason=choices[0].get("finish_reason"),
        usage=Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)),
        model=data.get("model", ""),
        latency_s=time.perf_counter() - started,
    )


def parse_delta(event: dict[str, Any]) -> Delta:
    choices = event.get("choices") or []
    usage = event.get("usage")
    choice = choices[0] if choices else {}
    return Delta(
        text=(choice.get("delta") or {}).get("content") or "",
        finish_reason=choice.get("finish_reason"),
        usage=Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        if usage
        else None,
    )


def connect(settings: Any = None, **overrides: Any) -> OpenAIChatModel:
    """An ``OpenAIChatModel`` for the configured server(s) (``AGENTKIT_LLM_URL`` etc.)."""
    from agentkit.settings import get_settings

    settings = settings or get_settings(**overrides)
    return OpenAIChatModel(
        settings.llm_urls(),
        api_key=settings.llm_api_key,
        model=settings.llm_model,
        timeout_s=settings.llm_timeout_s,
        max_retries=settings.llm_max_retries,
    )
