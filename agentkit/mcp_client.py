"""MCP servers' tools as agentkit tools (the official ``mcp`` SDK, ``pip install agentkit[mcp]``).

    with MCPConnection("python -m my_server") as server:          # stdio: a command
        ReAct(model, tools=server.tools()).run("…")
    ReAct(model, mcp_servers=["https://host/mcp"]).run("…")         # streamable HTTP: a URL

A connection is opened once and reused for every call: the SDK is async, so each connection
lives as a task on one background event-loop thread and the sync agents submit calls to it. A
call's arguments are checked against the tool's input schema (jsonschema) before it is sent; a
call that hangs is cut off after ``timeout_s``; a server that has died is started again once
and the call reported. Results become text: images, audio and binary resources are named, not
shown. Everything a server says (names, descriptions, schemas, results) is untrusted text: see
the README's "MCP servers are untrusted" section.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import re
import shlex
import tempfile
import threading
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from agentkit import tracing
from agentkit.errors import ConfigError, ToolError
from agentkit.tools.registry import Tool

MAX_DESCRIPTION_CHARS = 600  # a server's description is untrusted: bounded, one paragraph
MAX_RESULT_CHARS = 8000
MAX_TOOLS = 128  # per server: a listing that never ends cannot flood the prompt
MAX_PAGES = 20
NAME_UNSAFE = re.compile(r"\W")
INSTALL_HINT = "install the MCP extra: pip install 'agentkit[mcp]'"


class MCPServerSpec(BaseModel):
    """One MCP server: a ``command`` (stdio) or a ``url`` (streamable HTTP), as in agentkit.toml:

    ``[[mcp_servers]]`` with ``command = "python -m my_server"`` or ``url = "https://host/mcp"``
    and ``headers = {Authorization = "Bearer …"}``. A plain string is read as a URL when it
    starts with ``http://`` or ``https://``, else as a command.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, repr=False)  # may hold keys
    env: dict[str, str] | None = Field(None, repr=False)
    name: str | None = Field(
        None, description="Prefix for tool names that clash; default: derived."
    )
    timeout_s: float = Field(60.0, gt=0, description="Longest wait for one tool call.")
    connect_timeout_s: float = Field(60.0, gt=0, description="Longest wait to start and connect.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            return {"url": text} if text.startswith(("http://", "https://")) else {"command": text}
        return value

    @model_validator(mode="after")
    def _one_transport(self) -> MCPServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("an MCP server needs exactly one of command (stdio) or url (HTTP)")
        if self.command is not None and not shlex.split(self.command):
            raise ValueError("an MCP server's command is empty")
        return self

    @property
    def label(self) -> str:
        """How errors name the server (a URL without its query, or the command)."""
        return (self.url or "").split("?")[0] or str(self.command)

    @property
    def prefix(self) -> str:
        if self.name:
            return NAME_UNSAFE.sub("_", self.name)
        if self.url:
            host = self.url.split("://", 1)[1].split("/")[0].split(":")[0]
            return NAME_UNSAFE.sub("_", host.split(".")[0] or "mcp")
        words = [w for w in shlex.split(self.command or "") if not w.startswith("-")]
        last = words[-1].rsplit("/", 1)[-1].rsplit(".", 1)[0] if words else "mcp"
        return NAME_UNSAFE.sub("_", last) or "mcp"


def as_spec(server: MCPServerSpec | str | Mapping[str, Any]) -> MCPServerSpec:
    try:
        return server if isinstance(server, MCPServerSpec) else MCPServerSpec.model_validate(server)
    except ValueError as error:
        raise ConfigError(f"bad MCP server {server!r}: {error}") from None


# --- the background event loop ----------------------------------------------------------------

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()
_OPEN: weakref.WeakSet[MCPConnection] = weakref.WeakSet()  # closed at exit: stdio servers end


@atexit.register
def _close_all() -> None:
    for connection in list(_OPEN):
        connection.close()


def background_loop() -> asyncio.AbstractEventLoop:
    """The event loop, on a daemon thread, that every MCP connection of this process lives on."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="agentkit-mcp", daemon=True).start()
            _LOOP = loop
        return _LOOP


# --- results as observations --------------------------------------------------------------------


def result_text(result: Any) -> str:
    """A CallToolResult as one text observation; what cannot be shown as text is named."""
    parts: list[str] = []
    for block in result.content or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            size = len(block.data) * 3 // 4
            parts.append(
                f"[the tool returned {kind} ({block.mime_type}, ~{size} bytes): not shown]"
            )
        elif kind == "resource":
            inner = block.resource
            if getattr(inner, "text", None) is not None:
                parts.append(f"[resource {inner.uri}]\n{inner.text}")
            else:
                mime = getattr(inner, "mime_type", None) or "binary"
                parts.append(
                    f"[the tool returned a binary resource {inner.uri} ({mime}): not shown]"
                )
        elif kind == "resource_link":
            parts.append(f"[the tool returned a link to resource {block.uri} ({block.name})]")
        else:
            parts.append(f"[the tool returned {kind or 'unknown'} content: not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts) if parts else "(the tool returned nothing)"
    return text[:MAX_RESULT_CHARS]


def clean_description(text: str | None) -> str:
    """A server's tool description, bounded and on one line (it is shown to the model)."""
    flat = " ".join((text or "").split())
    return flat[:MAX_DESCRIPTION_CHARS] or "(no description)"


# --- tools ------------------------------------------------------------------------------------


@dataclass
class MCPTool(Tool):
    """An MCP server's tool: validated against its JSON schema, called through its connection."""

    input_schema: dict[str, Any] = field(default_factory=dict)
    remote_name: str = ""
    connection: MCPConnection | None = None

    def _arguments(self, arg: str | dict[str, Any]) -> dict[str, Any]:
        """A dict, JSON text, or (``tool[text]``) one string for the one string parameter."""
        properties = self.input_schema.get("properties") or {}
        if isinstance(arg, str):
            text = arg.strip()
            parsed: Any = None
            if text.startswith("{"):
                try:
                    parsed = json.loads(text)
                except ValueError:
                    parsed = None
            if isinstance(parsed, dict):
                arg = parsed
            elif not properties and not text:
                arg = {}
            else:
                strings = [n for n, p in properties.items() if p.get("type") in ("string", None)]
                required = self.input_schema.get("required") or []
                target = next((n for n in required if n in strings), None) or (
                    strings[0] if len(properties) == 1 and strings else None
                )
                if target is None:
                    raise ToolError(
                        f"{self.name} takes JSON arguments: {self.name}[{example(properties)}]"
                    )
                arg = {target: arg}
        from jsonschema import Draft202012Validator

        problems = [
            f"{'.'.join(map(str, e.absolute_path)) or 'arguments'}: {e.message}"
            for e in Draft202012Validator(self.input_schema).iter_errors(arg)
        ]
        if problems:
            raise ToolError(f"bad arguments for {self.name}: {'; '.join(problems[:5])}")
        return arg

    def __call__(self, arg: str | dict[str, Any] = "") -> str:
        assert self.connection is not None
        return self.connection.call(self.remote_name, self._arguments(arg))

    async def acall(self, arg: str | dict[str, Any] = "") -> str:
        return await asyncio.to_thread(self, arg)

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.input_schema,
            },
        }

    def describe(self) -> str:
        """For the text-mode prompt: the description and the JSON schema of the arguments."""
        schema = json.dumps(self.input_schema.get("properties") or {}, separators=(",", ":"))
        return f"- {self.name}[JSON arguments]: {self.description} Arguments: {schema[:800]}"


def example(properties: Mapping[str, Any]) -> str:
    return json.dumps({name: f"<{p.get('type', 'value')}>" for name, p in properties.items()})


def _checked_schema(schema: Any) -> dict[str, Any] | None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        return None
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError:
        return None
    return schema


# --- connections ------------------------------------------------------------------------------


class MCPConnection:
    """One open MCP server: its tools, and calls to them from any thread.

    Opened once (``open()`` or ``with``) and reused; ``close()`` ends the session (and a stdio
    server's process). A call that finds the server gone starts it again once.
    """

    def __init__(self, server: MCPServerSpec | str | Mapping[str, Any]) -> None:
        self.spec = as_spec(server)
        self._client: Any = None
        self._task: Future[None] | None = None
        self._stop: asyncio.Event | None = None
        self._tools: list[Any] = []
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile("w+") if self.spec.command else None

    # lifecycle

    def open(self) -> MCPConnection:
        with self._lock:
            if self._task is None or self._task.done():
                self._start()
        return self

    def _start(self) -> None:
        try:
            import mcp  # noqa: F401
        except ImportError:
            raise ConfigError(f"MCP servers need the mcp package: {INSTALL_HINT}") from None
        loop = background_loop()
        _OPEN.add(self)
        ready: Future[None] = Future()
        self._task = asyncio.run_coroutine_threadsafe(self._session(ready), loop)
        try:
            ready.result(timeout=self.spec.connect_timeout_s)
        except FutureTimeout:
            self._task.cancel()
            raise ToolError(
                f"the MCP server {self.spec.label} did not answer within "
                f"{self.spec.connect_timeout_s:.0f} s: check that it starts (connect_timeout_s)"
            ) from None
        except Exception as error:
            raise ToolError(
                f"cannot connect to the MCP server {self.spec.label}: {describe_error(error)}"
                f"{self._stderr_tail()}"
            ) from None

    async def _session(self, ready: Future[None]) -> None:
        from mcp import Client

        self._stop = asyncio.Event()
        try:
            async with self._transport() as transport, Client(transport) as client:
                listed = await client.list_tools()
                tools = list(listed.tools)
                for _ in range(MAX_PAGES):
                    if not listed.next_cursor or len(tools) >= MAX_TOOLS:
                        break
                    listed = await client.list_tools(cursor=listed.next_cursor)
                    tools += listed.tools
                self._client, self._tools = client, tools[:MAX_TOOLS]
                ready.set_result(None)
                await self._stop.wait()
        except BaseException as error:
            if not ready.done():
                ready.set_exception(error if isinstance(error, Exception) else RuntimeError(error))
            if not isinstance(error, Exception):
                raise
        finally:
            self._client = None

    def _transport(self) -> Any:
        """The SDK transport for the spec, in an async context that also closes what it made."""
        from contextlib import asynccontextmanager

        from mcp.client.stdio import StdioServerParameters, stdio_client
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        spec = self.spec

        @asynccontextmanager
        async def transport() -> Any:
            if spec.command is not None:
                words = shlex.split(spec.command)
                params = StdioServerParameters(command=words[0], args=words[1:], env=spec.env)
                yield stdio_client(params, errlog=self._stderr)
            else:
                assert spec.url is not None
                http = create_mcp_http_client(headers=dict(spec.headers))
                async with http:
                    yield streamable_http_client(spec.url, http_client=http)

        return transport()

    def close(self) -> None:
        task, stop = self._task, self._stop
        if task is not None and stop is not None and not task.done():
            background_loop().call_soon_threadsafe(stop.set)
            try:
                task.result(timeout=10)
            except Exception:  # a server that will not close cleanly is left to its process group
                task.cancel()
        self._task = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> MCPConnection:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and self._client is not None

    # tools and calls

    def tools(self) -> list[MCPTool]:
        """The server's tools as agentkit tools (names made safe: letters, digits, ``_``)."""
        self.open()
        made = []
        for listed in self._tools:
            schema = _checked_schema(listed.input_schema)
            if schema is None:  # a tool we cannot validate calls for is not offered
                continue
            name = NAME_UNSAFE.sub("_", listed.name)
            if not name or not name.isidentifier():
                name = f"{self.spec.prefix}_{name}"
            args = create_model(f"{name}_args", __config__=ConfigDict(extra="allow"))
            made.append(
                MCPTool(
                    name,
                    clean_description(listed.description),
                    self.call,
                    args,
                    input_schema=schema,
                    remote_name=listed.name,
                    connection=self,
                )
            )
        return made

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Call the server's tool ``name``; its result as text. Tool errors raise ToolError."""
        restarted = False
        if not self.alive:
            self._restart()
            restarted = True
        try:
            result = self._submit(name, arguments)
        except ToolError:
            raise
        except Exception as error:
            if is_timeout(error):
                raise self._timed_out(name) from None
            if not is_disconnect(error) or restarted:
                raise ToolError(f"{name} failed: {describe_error(error)}") from None
            self._restart(force=True)
            raise ToolError(
                f"the MCP server {self.spec.label} stopped during the call to {name} "
                f"({describe_error(error)}){self._stderr_tail()}; it was started again: "
                "call the tool again"
            ) from None
        text = result_text(result)
        if result.is_error:
            raise ToolError(text)
        return text

    def _submit(self, name: str, arguments: dict[str, Any]) -> Any:
        client = self._client
        if client is None:
            raise ToolError(f"the MCP server {self.spec.label} is not connected")
        timeout = self.spec.timeout_s
        carried = tracing.current_context()  # the SDK's client span joins the caller's trace

        async def call() -> Any:
            with tracing.use_context(carried):
                return await client.call_tool(name, arguments, read_timeout_seconds=timeout)

        future = asyncio.run_coroutine_threadsafe(call(), background_loop())
        try:
            return future.result(timeout=timeout + 1.0)
        except FutureTimeout:
            future.cancel()
            raise self._timed_out(name) from None

    def _timed_out(self, name: str) -> ToolError:
        return ToolError(
            f"{name} on {self.spec.label} did not answer within {self.spec.timeout_s:g} s and "
            "was cut off (the server's timeout_s)"
        )

    def _restart(self, force: bool = False) -> None:
        """Connect again (``force``: even if the session looks open, its server having gone)."""
        with self._lock:
            if self.alive and not force:
                return
            task, stop = self._task, self._stop
            if task is not None and not task.done():
                if stop is not None:
                    background_loop().call_soon_threadsafe(stop.set)
                try:
                    task.result(timeout=5)
                except Exception:
                    task.cancel()
            self._start()

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            lines = [line.strip() for line in self._stderr.read().splitlines() if line.strip()]
        except (OSError, ValueError):
            return ""
        return f"; its last output: {' | '.join(lines[-3:])[:400]}" if lines else ""


def is_timeout(error: BaseException) -> bool:
    from mcp.shared.exceptions import MCPError
    from mcp_types import REQUEST_TIMEOUT

    return isinstance(error, TimeoutError) or (
        isinstance(error, MCPError) and error.code == REQUEST_TIMEOUT
    )


def is_disconnect(error: BaseException) -> bool:
    """The server's end went away (a process that died, a connection that dropped)."""
    import anyio
    from mcp.shared.exceptions import MCPError
    from mcp_types import CONNECTION_CLOSED

    return isinstance(
        error, (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)
    ) or (isinstance(error, MCPError) and error.code == CONNECTION_CLOSED)


def describe_error(error: BaseException) -> str:
    """An exception as a short message (task groups wrap the real cause)."""
    while getattr(error, "exceptions", None):  # an ExceptionGroup
        error = error.exceptions[0]  # type: ignore[attr-defined]
    return str(error) or type(error).__name__


def open_servers(servers: Iterable[MCPServerSpec | str | Mapping[str, Any]]) -> list[MCPConnection]:
    """Connections to ``servers``, all open (closing those already opened if one fails)."""
    opened: list[MCPConnection] = []
    try:
        for server in servers:
            opened.append(
                server.open() if isinstance(server, MCPConnection) else MCPConnection(server).open()
            )
    except BaseException:
        for connection in opened:
            connection.close()
        raise
    return opened


def mcp_tools(connections: Iterable[MCPConnection], taken: Iterable[str] = ()) -> list[MCPTool]:
    """Every connection's tools; a name already ``taken`` (or seen) gets the server's prefix."""
    names = {n.lower() for n in taken}
    tools = []
    for connection in connections:
        for made in connection.tools():
            if made.name.lower() in names:
                made.name = f"{connection.spec.prefix}_{made.name}"
            if made.name.lower() in names:
                continue
            names.add(made.name.lower())
            tools.append(made)
    return tools
