"""The httpx client against a local server that fails on purpose: retries, errors, SSE."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import httpx
import pytest
from fake_server import MODELS, completion_body, fake_server, sse_body

from agentkit.errors import LLMError, ModelServerError
from agentkit.llm import Attempt, ModelSettings, OpenAIChatModel, Structured
from agentkit.sse import iter_events
from agentkit.testing import ScriptedChatModel

JSON = {"Content-Type": "application/json"}
SSE = {"Content-Type": "text/event-stream"}
HELLO = [{"role": "user", "content": "hello"}]


def client(url: str, **kw: object) -> OpenAIChatModel:
    return OpenAIChatModel(url, model="fake", backoff_s=0.01, **kw)  # type: ignore[arg-type]


def failing_then(ok: bytes, failures: int, status: int = 503, headers=JSON):
    def handle(path, body, n):
        if n <= failures:
            return status, {**JSON, "Retry-After": "0"}, b'{"error": {"message": "busy"}}'
        return 200, headers, ok

    return handle


def test_5xx_and_429_are_retried_until_the_server_answers() -> None:
    for status in (503, 429, 500):
        with fake_server(failing_then(completion_body("hi there"), 2, status)) as (url, log):
            completion = client(url).complete(HELLO, max_tokens=5, temperature=0)
        assert completion.text == "hi there" and len(log) == 3
        assert completion.usage.total_tokens == 5
        assert log[-1][1]["max_tokens"] == 5 and log[-1][1]["messages"] == HELLO


def test_retries_are_bounded_and_end_in_a_clear_error() -> None:
    with fake_server(failing_then(b"", 99)) as (url, log):
        with pytest.raises(ModelServerError, match="kept failing .503"):
            client(url, max_retries=2).complete(HELLO)
    assert len(log) == 3


def test_a_bad_request_is_not_retried_and_carries_the_servers_reason() -> None:
    def handle(path, body, n):
        return 400, JSON, b'{"error": {"message": "max_tokens is too large"}}'

    with fake_server(handle) as (url, log):
        with pytest.raises(LLMError, match="max_tokens is too large"):
            client(url).complete(HELLO)
    assert len(log) == 1


def test_a_wrong_api_key_says_which_setting_to_fix() -> None:
    with fake_server(lambda p, b, n: (401, JSON, b'{"error": "no"}')) as (url, _):
        with pytest.raises(LLMError, match="AGENTKIT_LLM_API_KEY"):
            client(url, api_key="wrong").complete(HELLO)


def test_no_server_names_the_fix() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(ModelServerError, match="agentkit model serve"):
            client(f"http://127.0.0.1:{port}", max_retries=1).complete(HELLO)


def test_model_name_context_and_token_counts_come_from_the_server() -> None:
    def handle(path, body, n):
        if path == "/v1/models":
            return 200, JSON, MODELS
        if path == "/tokenize":
            return 200, JSON, json.dumps({"count": 17, "max_model_len": 2048}).encode()
        return 200, JSON, completion_body("x")

    with fake_server(handle) as (url, log):
        model = OpenAIChatModel(url + "/v1/")
        assert (model.model, model.context_length(), model.count_tokens(HELLO)) == (
            "fake",
            2048,
            17,
        )
        model.complete(HELLO, stop=["\n"], structured=Structured(regex=r"\d+"))
    body = log[-1][1]
    assert body["model"] == "fake" and body["stop"] == ["\n"]
    assert body["structured_outputs"] == {"regex": r"\d+"}


def test_structured_takes_exactly_one_constraint() -> None:
    assert Structured(choice=["a", "b"]).to_request() == {"choice": ["a", "b"]}
    assert Structured(json_schema={"type": "object"}).to_request() == {"json": {"type": "object"}}
    with pytest.raises(LLMError, match="exactly one"):
        Structured(regex="a", choice=["a"]).to_request()


def test_streaming_yields_the_pieces_then_usage_and_retries_before_the_first_byte() -> None:
    with fake_server(failing_then(sse_body(["Hel", "lo", "!"]), 1, headers=SSE)) as (url, log):
        deltas = list(client(url).stream(HELLO))
    assert "".join(d.text for d in deltas) == "Hello!" and len(log) == 2
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 2
    assert any(d.finish_reason == "stop" for d in deltas)
    assert log[-1][1]["stream"] is True


def test_a_stream_cut_off_before_done_is_an_error_not_a_short_answer() -> None:
    with fake_server(lambda p, b, n: (200, SSE, sse_body(["Hel"], done=False))) as (url, _):
        with pytest.raises(LLMError, match="before it finished"):
            list(client(url).stream(HELLO))


def test_sse_parsing_skips_comments_and_reports_errors_and_garbage() -> None:
    lines = [": ping", "", 'data: {"choices": []}', "event: x", "data: [DONE]", "data: late"]
    assert list(iter_events(lines)) == [{"choices": []}]
    with pytest.raises(LLMError, match="mid-stream: boom"):
        list(iter_events(['data: {"error": "boom"}']))
    with pytest.raises(LLMError, match="malformed"):
        list(iter_events(["data: {not json"]))


def test_async_complete_and_stream() -> None:
    async def run(url: str) -> tuple[str, str]:
        model = client(url)
        done = await model.acomplete(HELLO)
        streamed = "".join([d.text async for d in model.astream(HELLO)])
        await model.aclose()
        return done.text, streamed

    def handle(path, body, n):
        if n == 1:
            return 502, JSON, b"{}"
        if body and body.get("stream"):
            return 200, SSE, sse_body(["a", "b"])
        return 200, JSON, completion_body("ab")

    with fake_server(handle) as (url, log):
        assert asyncio.run(run(url)) == ("ab", "ab")
    assert len(log) == 3


def test_requests_are_spread_over_replicas_and_a_dead_one_is_skipped() -> None:
    ok = lambda p, b, n: (200, JSON, completion_body("ok"))  # noqa: E731
    with fake_server(ok) as (a, log_a), fake_server(ok) as (b, log_b):
        model = OpenAIChatModel([a, b], model="fake", backoff_s=0.01)
        for _ in range(6):
            model.complete(HELLO)
        assert (len(log_a), len(log_b)) == (3, 3)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
            model = OpenAIChatModel([dead, a], model="fake", backoff_s=0.01)
            assert [model.complete(HELLO).text for _ in range(4)] == ["ok"] * 4


def test_tool_calls_are_sent_and_parsed() -> None:
    answer = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "search", "arguments": '{"entity": "Paris"}'},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3},
    }
    with fake_server(lambda p, b, n: (200, JSON, json.dumps(answer).encode())) as (url, log):
        tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
        done = client(url).complete_tools(HELLO, tools)
    assert [(c.id, c.name, c.arguments) for c in done.tool_calls] == [
        ("c1", "search", '{"entity": "Paris"}')
    ]
    assert log[0][1]["tools"] == tools and log[0][1]["tool_choice"] == "auto"


def texts(model: OpenAIChatModel, kind: str, calls: int, **options: object) -> list[str]:
    """The replies of ``calls`` calls of ``model.<kind>`` (the async ones in one event loop)."""

    async def awaited() -> list[str]:
        done = []
        for _ in range(calls):
            if kind == "acomplete":
                done.append((await model.acomplete(HELLO, **options)).text)
            else:
                done.append("".join([d.text async for d in model.astream(HELLO, **options)]))
        await model.aclose()
        return done

    if kind == "complete":
        return [model.complete(HELLO, **options).text for _ in range(calls)]
    if kind == "stream":
        return ["".join(d.text for d in model.stream(HELLO, **options)) for _ in range(calls)]
    return asyncio.run(awaited())


def test_one_settings_object_or_keywords_give_the_same_request_and_keywords_win() -> None:
    constraint = Structured(choice=["a", "b"])
    settings = ModelSettings(max_tokens=5, temperature=0.0, stop=["\n"], n=2, structured=constraint)
    with fake_server(lambda p, b, n: (200, JSON, completion_body("a"))) as (url, log):
        model = client(url)
        model.complete(HELLO, settings)
        model.complete(
            HELLO, max_tokens=5, temperature=0.0, stop=["\n"], n=2, structured=constraint
        )
        model.complete(HELLO, settings, max_tokens=9, stop=None)  # None: keep the setting
    expected = {"model": "fake", "messages": HELLO, "max_tokens": 5, "temperature": 0.0}
    expected |= {"stop": ["\n"], "n": 2, "structured_outputs": {"choice": ["a", "b"]}}
    assert log[0][1] == expected and log[1][1] == expected
    assert log[2][1] == {**log[0][1], "max_tokens": 9}
    scripted = ScriptedChatModel(["a", "b"])
    assert scripted.complete(HELLO, settings).texts == ["a", "b"]
    assert scripted.calls[0].kwargs == vars(settings)
    with pytest.raises(TypeError, match="max_token"):
        scripted.complete(HELLO, max_token=5)
    with pytest.raises(LLMError, match="one choice"):
        list(scripted.stream(HELLO, settings))


def test_one_function_decides_whether_to_retry_and_how_long_to_wait() -> None:
    model = OpenAIChatModel("http://127.0.0.1:9", model="fake", max_retries=6, backoff_s=0.5)
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")

    def delay(
        retries: int, outcome: httpx.Response | httpx.TransportError, sent: bool = False
    ) -> float | None:
        return model._retry_delay(retries, Attempt("http://x", None, 0.0, outcome, sent))

    def answer(status: int, **headers: str) -> httpx.Response:
        return httpx.Response(status, headers=headers, request=request)

    refused = httpx.ConnectError("refused")
    assert [delay(n, answer(503)) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, None]
    assert [delay(n, refused) for n in (0, 1, 6)] == [0.5, 1.0, None]
    assert delay(0, answer(429, **{"retry-after": "2.5"})) == 2.5
    assert delay(0, answer(429, **{"retry-after": "120"})) == 30.0  # capped
    assert delay(1, answer(429, **{"retry-after": "Fri, 31 Dec 1999"})) == 1.0  # a date: backoff
    assert [delay(0, answer(status)) for status in (200, 400, 401, 404)] == [None] * 4
    assert delay(0, refused, sent=True) is None  # a stream that sent text is not repeated


class Truncated(bytes):
    """A body that announces more bytes than it has: the connection ends in the middle of it."""

    def __len__(self) -> int:
        return super().__len__() + 1000


@pytest.mark.parametrize("kind", ["stream", "astream"])
def test_a_stream_is_retried_until_its_first_event_and_never_after(kind: str) -> None:
    def handle(path, body, n):  # the first answer breaks before an event, the second after one
        return 200, SSE, Truncated(b"" if n == 1 else sse_body(["Hel"], done=False))

    with fake_server(handle) as (url, log):
        model, pieces = client(url), []

        async def consume() -> None:
            async for delta in model.astream(HELLO):
                pieces.append(delta.text)

        with pytest.raises(LLMError, match="broke off"):
            if kind == "stream":
                pieces.extend(d.text for d in model.stream(HELLO))
            else:
                asyncio.run(consume())
    assert pieces == ["Hel"] and len(log) == 2


@pytest.mark.parametrize("kind", ["complete", "stream", "acomplete", "astream"])
def test_a_server_that_refuses_structured_outputs_gets_requests_without_it(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = (
        b'{"error": {"message": "Unrecognized request argument supplied: structured_outputs"}}'
    )

    def handle(path, body, n):
        if "structured_outputs" in body:
            return 400, JSON, refusal
        return (
            (200, SSE, sse_body(["a"])) if body.get("stream") else (200, JSON, completion_body("a"))
        )

    with fake_server(handle) as (url, log), caplog.at_level(logging.WARNING, "agentkit.llm"):
        replies = texts(client(url), kind, 2, structured=Structured(choice=["a"]))
    assert replies == ["a", "a"]
    assert ["structured_outputs" in body for _, body in log] == [True, False, False]
    assert len(caplog.records) == 1 and "0.10.2" in caplog.text


def test_a_refused_constraint_is_an_error_not_a_silent_fallback() -> None:
    reason = b'{"error": {"message": "structured_outputs: the regex ( is invalid"}}'
    with fake_server(lambda p, b, n: (400, JSON, reason)) as (url, log):
        with pytest.raises(LLMError, match="regex . is invalid"):
            client(url).complete(HELLO, structured=Structured(regex="("))
    assert len(log) == 1
