"""The model client: one ``ChatModel`` protocol and its httpx implementation.

``OpenAIChatModel`` talks to any OpenAI-compatible server (vLLM first of all): chat completions,
streaming over SSE, vLLM's structured outputs, ``/tokenize`` for exact prompt sizes and
``max_model_len`` for the context. Connection errors, timeouts, 429 and 5xx are retried with
exponential backoff (spreading over replicas when several URLs are given); every other failure
becomes an ``LLMError``/``ModelServerError`` whose message says what to do.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx

from agentkit.errors import LLMError, ModelServerError
from agentkit.sse import aiter_events, iter_events

Message = Mapping[str, str]
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
START_HINT = "start one with `agentkit model serve` or set AGENTKIT_LLM_URL"


@dataclass(frozen=True)
class Structured:
    """vLLM structured outputs: exactly one of a regex, a JSON schema, a choice or a grammar."""

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
    """What agents need from a model. ``OpenAIChatModel`` and ``ScriptedChatModel`` implement it."""

    def complete(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int = 1,
        structured: Structured | None = None,
    ) -> Completion: ...

    def stream(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        structured: Structured | None = None,
    ) -> Iterator[Delta]: ...

    async def acomplete(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int = 1,
        structured: Structured | None = None,
    ) -> Completion: ...

    def astream(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        structured: Structured | None = None,
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
        data = self._send("GET", "/v1/models", None).json().get("data") or []
        if not data:
            raise ModelServerError(f"the model server at {self.urls[0]} serves no model")
        entry = next((d for d in data if d.get("id") == self._model), None)
        if entry is None and self._model is not None:
            served = ", ".join(d.get("id", "?") for d in data)
            raise LLMError(f"model {self._model!r} is not served (served: {served}); fix the name")
        entry = entry or data[0]
        self._model = self._model or entry["id"]
        self._max_model_len = entry.get("max_model_len")

    def count_tokens(self, messages: Sequence[Message]) -> int:
        body = {"model": self.model, "messages": list(messages), "add_generation_prompt": True}
        try:
            return int(self._send("POST", "/tokenize", body).json()["count"])
        except LLMError:  # not vLLM: an estimate that errs on the large side
            return sum(len(m.get("content", "")) // 3 + 8 for m in messages)

    # --- requests -------------------------------------------------------------------------------

    def _body(
        self,
        messages: Sequence[Message],
        stop: Sequence[str] | None,
        max_tokens: int | None,
        temperature: float | None,
        n: int,
        structured: Structured | None,
        stream: bool,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {**self.extra_body, "model": self.model, "messages": list(messages)}
        if n != 1:
            body["n"] = n
        if stop:
            body["stop"] = list(stop)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if structured is not None:
            body["structured_outputs"] = structured.to_request()
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def complete(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int = 1,
        structured: Structured | None = None,
    ) -> Completion:
        started = time.perf_counter()
        body = self._body(messages, stop, max_tokens, temperature, n, structured, False)
        return parse_completion(self._send("POST", "/v1/chat/completions", body).json(), started)

    def complete_tools(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Completion:
        """A completion that may call ``tools`` (OpenAI schema); vLLM needs a tool-call parser."""
        started = time.perf_counter()
        body = self._body(messages, None, max_tokens, temperature, 1, None, False)  # type: ignore[arg-type]
        body["tools"], body["tool_choice"] = list(tools), "auto"
        return parse_completion(self._send("POST", "/v1/chat/completions", body).json(), started)

    async def acomplete(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        n: int = 1,
        structured: Structured | None = None,
    ) -> Completion:
        started = time.perf_counter()
        if self._model is None:
            await asyncio.to_thread(self._load_models)
        body = self._body(messages, stop, max_tokens, temperature, n, structured, False)
        response = await self._asend("POST", "/v1/chat/completions", body)
        return parse_completion(response.json(), started)

    def stream(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        structured: Structured | None = None,
    ) -> Iterator[Delta]:
        body = self._body(messages, stop, max_tokens, temperature, 1, structured, True)
        sent = False
        for attempt in itertools.count():
            url = self._next_url()
            try:
                with self._client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code in RETRY_STATUS and attempt < self.max_retries:
                        time.sleep(self._delay(attempt, r))
                        continue
                    check_status(r, url, read=r.read)
                    for event in iter_events(r.iter_lines()):
                        sent = True
                        yield parse_delta(event)
                    return
            except httpx.TransportError as error:
                if sent:  # a retry would repeat text the caller already has
                    raise LLMError(f"the stream from {url} broke off ({error}); retry") from None
                if attempt >= self.max_retries:
                    raise transport_error(error, url, self.timeout) from None
                time.sleep(self._delay(attempt, None))

    async def astream(
        self,
        messages: Sequence[Message],
        *,
        stop: Sequence[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        structured: Structured | None = None,
    ) -> AsyncIterator[Delta]:
        if self._model is None:
            await asyncio.to_thread(self._load_models)
        body = self._body(messages, stop, max_tokens, temperature, 1, structured, True)
        client = self._async_client()
        sent = False
        for attempt in itertools.count():
            url = self._next_url()
            try:
                async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code in RETRY_STATUS and attempt < self.max_retries:
                        await asyncio.sleep(self._delay(attempt, r))
                        continue
                    if r.status_code >= 400:
                        await r.aread()
                    check_status(r, url, read=lambda: r.content)
                    async for event in aiter_events(r.aiter_lines()):
                        sent = True
                        yield parse_delta(event)
                    return
            except httpx.TransportError as error:
                if sent:
                    raise LLMError(f"the stream from {url} broke off ({error}); retry") from None
                if attempt >= self.max_retries:
                    raise transport_error(error, url, self.timeout) from None
                await asyncio.sleep(self._delay(attempt, None))

    # --- transport with retries -----------------------------------------------------------------

    def _next_url(self) -> str:
        return self.urls[next(self._turn) % len(self.urls)]

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), 30.0)
        return min(self.backoff_s * 2**attempt, 8.0)

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        for attempt in itertools.count():
            url = self._next_url()
            try:
                response = self._client.request(method, url + path, json=body)
            except httpx.TransportError as error:
                if attempt >= self.max_retries:
                    raise transport_error(error, url, self.timeout) from None
                time.sleep(self._delay(attempt, None))
                continue
            if response.status_code in RETRY_STATUS and attempt < self.max_retries:
                time.sleep(self._delay(attempt, response))
                continue
            check_status(response, url)
            return response
        raise AssertionError("unreachable")

    async def _asend(self, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
        client = self._async_client()
        for attempt in itertools.count():
            url = self._next_url()
            try:
                response = await client.request(method, url + path, json=body)
            except httpx.TransportError as error:
                if attempt >= self.max_retries:
                    raise transport_error(error, url, self.timeout) from None
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if response.status_code in RETRY_STATUS and attempt < self.max_retries:
                await asyncio.sleep(self._delay(attempt, response))
                continue
            check_status(response, url)
            return response
        raise AssertionError("unreachable")

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


def transport_error(error: httpx.TransportError, url: str, timeout: httpx.Timeout) -> Exception:
    if isinstance(error, httpx.TimeoutException):
        return ModelServerError(
            f"the model server at {url} did not answer within {timeout.read:.0f} s: it may be "
            "overloaded; raise AGENTKIT_LLM_TIMEOUT_S or ask for fewer tokens"
        )
    return ModelServerError(f"no model server at {url} ({type(error).__name__}): {START_HINT}")


def check_status(response: httpx.Response, url: str, read: Any = None) -> None:
    """Raise our error for a failed response; ``read`` loads the body of a streamed one."""
    status = response.status_code
    if status < 400:
        return
    if read is not None:
        read()
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
