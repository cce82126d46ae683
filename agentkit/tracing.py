"""OpenTelemetry traces of every agent step; off by default and free when off.

Tracing turns on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)
is set, exporting OTLP over HTTP with the standard ``OTEL_*`` variables
(``pip install 'agentkit[opentelemetry]'``), or when ``enable()`` is given a tracer provider.
Off, ``span()`` returns one shared no-op object and opentelemetry is never imported.

The tree of a run (span names; attributes follow the GenAI semantic conventions where they exist):

    invoke_agent agentkit-rag            gen_ai.operation.name, gen_ai.agent.name
      retrieval                          agentkit.retrieval.{query,k,mode,hits}
      chat <model>                       gen_ai.request.*, gen_ai.usage.*, finish reasons
    invoke_agent agentkit-react
      react_step                         agentkit.step.{index,action,parse_failed,tool_error}
        chat <model>
        execute_tool <name>              gen_ai.tool.name (arguments only with content capture)
    invoke_agent agentkit-pal
      chat <model>
      sandbox_run                        agentkit.sandbox.{outcome,duration_ms,isolation}

Guard and critique steps use ``span("guard <name>", {"agentkit.guard.name": …,
"agentkit.guard.verdict": …})`` (see ``guard_span``). Prompts, completions, tool arguments and
programs are recorded only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.
``headers()`` gives the ``traceparent`` of the current span for outgoing requests (the model
client sends it to vLLM, whose spans then join the trace when it runs with tracing on).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

CONTENT_VARIABLE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
MAX_ATTRIBUTE_CHARS = 2000
MAX_CONTENT_CHARS = 32000  # prompts, completions, programs (only with content capture)

_TRACER: Any = None  # an opentelemetry Tracer while tracing is on
_CHECKED = False  # the environment has been read
_CONTENT = False


class NoSpan:
    """What ``span()`` gives when tracing is off: every method does nothing."""

    def __enter__(self) -> NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set(self, key: str, value: Any, limit: int = MAX_ATTRIBUTE_CHARS) -> None:
        pass

    def completion(self, completion: Any) -> None:
        pass

    def rename(self, name: str) -> None:
        pass

    def end(self) -> None:
        pass

    def context(self) -> None:
        return None


NO_SPAN = NoSpan()


class Span:
    """A started span: ``set`` attributes, ``completion`` records a model's reply."""

    def __init__(self, raw: Any, scope: Any = None) -> None:
        self.raw, self._scope = raw, scope

    def __enter__(self) -> Span:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        if isinstance(error, GeneratorExit):  # its reader stopped early (a client went away)
            self.raw.set_attribute("agentkit.closed_early", True)
        elif error is not None:
            from opentelemetry.trace import Status, StatusCode

            self.raw.record_exception(error)
            self.raw.set_status(Status(StatusCode.ERROR, str(error)[:500]))
            self.raw.set_attribute("error.type", type(error).__qualname__)
        self.end()

    def end(self) -> None:
        if self._scope is not None:
            scope, self._scope = self._scope, None
            scope.__exit__(None, None, None)
        self.raw.end()

    def set(self, key: str, value: Any, limit: int = MAX_ATTRIBUTE_CHARS) -> None:
        if value is None:
            return
        if isinstance(value, str):
            value = value[:limit]
        elif not isinstance(value, (bool, int, float)) and not (
            isinstance(value, Sequence) and all(isinstance(v, (str, int, float)) for v in value)
        ):
            value = str(value)[:limit]
        self.raw.set_attribute(key, value)

    def rename(self, name: str) -> None:
        self.raw.update_name(name)

    def context(self) -> Any:
        """A context with this span current: ``use_context`` it around work between yields."""
        from opentelemetry import trace

        return trace.set_span_in_context(self.raw)

    def completion(self, completion: Any) -> None:
        """Usage, finish reason and response model of a ``Completion`` (GenAI conventions)."""
        usage = completion.usage
        self.set("gen_ai.usage.input_tokens", usage.prompt_tokens)
        self.set("gen_ai.usage.output_tokens", usage.completion_tokens)
        if completion.finish_reason:
            self.set("gen_ai.response.finish_reasons", [completion.finish_reason])
        if completion.model:
            self.set("gen_ai.response.model", completion.model)
        if getattr(completion, "tool_calls", None):
            self.set("agentkit.tool_calls", [c.name for c in completion.tool_calls])
        if _CONTENT:
            self.set("gen_ai.output.messages", json.dumps(completion.texts), MAX_CONTENT_CHARS)


def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    current: bool = True,
    kind: str = "internal",
) -> Any:
    """A span around a block (``with tracing.span(...) as s``); ``NO_SPAN`` when tracing is off.

    ``current=False`` does not make it the parent of spans opened inside (for spans that stay
    open across a generator's yields, where contexts cannot be attached and detached).
    ``kind``: internal, server (an incoming request) or client.
    """
    tracer = _TRACER if _CHECKED else _from_environment()
    if tracer is None:
        return NO_SPAN
    return _start(tracer, name, attributes, current, kind)


def _start(
    tracer: Any, name: str, attributes: Mapping[str, Any] | None, current: bool, kind: str
) -> Span:
    from opentelemetry import trace

    raw = tracer.start_span(name, kind=getattr(trace.SpanKind, kind.upper()))
    scope = trace.use_span(raw, end_on_exit=False) if current else None
    if scope is not None:
        scope.__enter__()
    started = Span(raw, scope)
    for key, value in (attributes or {}).items():
        started.set(key, value)
    return started


def enabled() -> bool:
    return (_TRACER if _CHECKED else _from_environment()) is not None


def capture_content() -> bool:
    """Whether prompts, completions, tool arguments and programs go into spans."""
    return enabled() and _CONTENT


def enable(provider: Any = None, *, content: bool | None = None) -> None:
    """Trace from now on, to ``provider`` (a TracerProvider, e.g. with an in-memory exporter in
    tests) or, without one, to an OTLP/HTTP exporter configured by the ``OTEL_*`` variables."""
    global _TRACER, _CHECKED, _CONTENT
    from opentelemetry import trace

    if provider is None:
        provider = _otlp_provider()
    _TRACER = provider.get_tracer("agentkit")
    _CHECKED = True
    _CONTENT = (
        content
        if content is not None
        else os.environ.get(CONTENT_VARIABLE, "").lower() in ("1", "true", "yes")
    )
    current = trace.get_tracer_provider()
    if type(current).__name__ == "ProxyTracerProvider":  # unset: libraries (the MCP SDK) join in
        trace.set_tracer_provider(provider)


def disable() -> None:
    """Stop tracing (spans already started still end)."""
    global _TRACER, _CHECKED
    _TRACER, _CHECKED = None, True


def _from_environment() -> Any:
    global _CHECKED
    _CHECKED = True
    if any(os.environ.get(v) for v in ENDPOINT_VARIABLES) and os.environ.get(
        "OTEL_SDK_DISABLED", ""
    ).lower() not in ("1", "true"):
        try:
            enable()
        except ImportError:
            import logging

            logging.getLogger(__name__).warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
                "pip install 'agentkit[opentelemetry]'; tracing stays off"
            )
    return _TRACER


def _otlp_provider() -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "agentkit")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


# --- context in and out -------------------------------------------------------------------------


def headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the current span, for an outgoing request."""
    if not (_TRACER if _CHECKED else _from_environment()):
        return {}
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


def current_context() -> Any:
    """The current trace context, to carry to another thread or event loop (None when off)."""
    if not (_TRACER if _CHECKED else _from_environment()):
        return None
    from opentelemetry import context

    return context.get_current()


@contextmanager
def use_context(carried: Any) -> Iterator[None]:
    """Make ``carried`` (from ``current_context`` or ``extract``) current inside the block."""
    if carried is None:
        yield
        return
    from opentelemetry import context

    token = context.attach(carried)
    try:
        yield
    finally:
        context.detach(token)


def extract(carrier: Mapping[str, str]) -> Any:
    """The trace context an incoming request's headers carry (None when off)."""
    if not (_TRACER if _CHECKED else _from_environment()):
        return None
    from opentelemetry.propagate import extract as otel_extract

    return otel_extract(dict(carrier))


# --- agent steps -------------------------------------------------------------------------------


def agent_span(name: str, question: str = "", *, current: bool = True) -> Any:
    """The span of one agent run (``invoke_agent <name>``)."""
    attributes = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": name}
    if _CONTENT and question:
        attributes["gen_ai.input"] = question
    return span(f"invoke_agent {name}", attributes, current=current)


def guard_span(name: str, **attributes: Any) -> Any:
    """The hook for guard and critique steps: ``with guard_span("pii") as s: …
    s.set("agentkit.guard.verdict", "blocked")``."""
    return span(
        f"guard {name}",
        {"agentkit.guard.name": name, **{f"agentkit.guard.{k}": v for k, v in attributes.items()}},
    )


def model_attributes(model: Any, options: Mapping[str, Any], operation: str) -> dict[str, Any]:
    name = getattr(model, "_model", None)  # OpenAIChatModel's, once known (no request for it)
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": "openai",  # the OpenAI-compatible API (vLLM)
        "gen_ai.request.model": name,
        "gen_ai.request.max_tokens": options.get("max_tokens"),
        "gen_ai.request.temperature": options.get("temperature"),
    }
    if options.get("n", 1) not in (None, 1):
        attributes["gen_ai.request.choice.count"] = options["n"]
    return attributes


def complete(model: Any, messages: Any, *, tools: Any = None, **options: Any) -> Any:
    """``model.complete(messages, **options)`` (``complete_tools`` with ``tools``) in a
    ``chat`` span; without tracing, just the call."""
    call = model.complete if tools is None else model.complete_tools
    args = (messages,) if tools is None else (messages, tools)
    if not (_TRACER if _CHECKED else _from_environment()):
        return call(*args, **options)
    attributes = model_attributes(model, options, "chat")
    requested = attributes["gen_ai.request.model"]
    with span(f"chat {requested}" if requested else "chat", attributes) as open_span:
        if _CONTENT:
            prompt = json.dumps(list(messages), ensure_ascii=False, default=str)
            open_span.set("gen_ai.input.messages", prompt, MAX_CONTENT_CHARS)
        completion = call(*args, **options)
        open_span.completion(completion)
        if not requested and completion.model:
            open_span.rename(f"chat {completion.model}")
        return completion


def stream(model: Any, messages: Any, *, parent: Any = None, **options: Any) -> Iterator[Any]:
    """``model.stream(messages, **options)`` with a ``chat`` span over the whole stream, a child
    of the span ``parent`` (else of the current one)."""
    if not (_TRACER if _CHECKED else _from_environment()):
        yield from model.stream(messages, **options)
        return
    attributes = {**model_attributes(model, options, "chat"), "gen_ai.request.stream": True}
    with use_context(parent.context() if parent is not None else None):
        requested = attributes["gen_ai.request.model"]
        name = f"chat {requested}" if requested else "chat"
        open_span = span(name, attributes, current=False)
    try:
        for delta in model.stream(messages, **options):
            if delta.usage is not None:
                open_span.set("gen_ai.usage.input_tokens", delta.usage.prompt_tokens)
                open_span.set("gen_ai.usage.output_tokens", delta.usage.completion_tokens)
            if delta.finish_reason:
                open_span.set("gen_ai.response.finish_reasons", [delta.finish_reason])
            yield delta
    except BaseException as error:
        open_span.__exit__(type(error), error, None)
        raise
    else:
        open_span.end()
