"""Tools agents can call: the ``@tool`` decorator and a registry.

    @tool
    def weather(city: str) -> str:
        '''Today's weather in a city.'''
        return lookup_weather(city)

The name is the function's, the description its docstring, the arguments are validated by a
pydantic model built from the type hints. Sync and async functions both work. ``from_langchain``
wraps any LangChain tool.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError, create_model

from agentkit.errors import ToolError


@dataclass
class Tool:
    name: str
    description: str
    func: Callable[..., Any]
    args_model: type[BaseModel]

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    def _arguments(self, arg: str | dict[str, Any]) -> dict[str, Any]:
        """``search[Paris]`` passes one string: it fills the single (or first) parameter."""
        fields = list(self.args_model.model_fields)
        if isinstance(arg, str):
            stripped = arg.strip()
            if stripped.startswith("{") and len(fields) > 1:
                try:
                    arg = json.loads(stripped)
                except ValueError:
                    pass
        if isinstance(arg, str):
            arg = {fields[0]: arg} if fields else {}
        try:
            return self.args_model.model_validate(arg).model_dump()
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()
            )
            raise ToolError(f"bad arguments for {self.name}: {problems}") from None

    def __call__(self, arg: str | dict[str, Any] = "") -> Any:
        result = self.func(**self._arguments(arg))
        if inspect.isawaitable(result):
            return asyncio.run(result) if not _loop_running() else _run_in_thread(result)
        return result

    async def acall(self, arg: str | dict[str, Any] = "") -> Any:
        kwargs = self._arguments(arg)
        if self.is_async:
            return await self.func(**kwargs)
        return await asyncio.to_thread(self.func, **kwargs)

    def describe(self) -> str:
        """The tool's line in a text-mode prompt's tool list."""
        return f"- {self.name}[...]: {self.description}"

    def openai_schema(self) -> dict[str, Any]:
        """The tool as an OpenAI/vLLM ``tools`` entry, for tool-calling models."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.args_model.model_json_schema(),
            },
        }


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _run_in_thread(awaitable: Any) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, awaitable).result()


def tool(
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
) -> Any:
    """Turn a function into a ``Tool`` (``@tool`` or ``@tool(name=..., description=...)``)."""

    def wrap(f: Callable[..., Any]) -> Tool:
        signature = inspect.signature(f)
        fields: dict[str, Any] = {}
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ToolError(f"tool {f.__name__}: *args/**kwargs cannot be described; name them")
            annotation = param.annotation if param.annotation is not param.empty else str
            default = param.default if param.default is not param.empty else ...
            fields[param.name] = (annotation, default)
        doc = (description or inspect.getdoc(f) or "").strip()
        if not doc:
            raise ToolError(
                f"tool {f.__name__} needs a docstring or description= (the model reads it)"
            )
        tool_name = name or f.__name__
        if not tool_name.isidentifier():
            raise ToolError(f"tool name {tool_name!r} must be a Python identifier")
        model = create_model(f"{tool_name}_args", **fields)
        return Tool(tool_name, doc.splitlines()[0], f, model)

    return wrap(func) if func is not None else wrap


def from_langchain(lc_tool: Any) -> Tool:
    """Wrap a LangChain ``BaseTool`` (anything with name, description and invoke)."""
    schema = getattr(lc_tool, "args_schema", None)
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        schema = create_model(f"{lc_tool.name}_args", input=(str, ...))

    def call(**kwargs: Any) -> Any:
        return lc_tool.invoke(
            kwargs if len(kwargs) != 1 or "input" not in kwargs else kwargs["input"]
        )

    return Tool(lc_tool.name, lc_tool.description, call, schema)


class ToolRegistry:
    """Tools by name, in the order they were added."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, t: Tool | Callable[..., Any]) -> Tool:
        if not isinstance(t, Tool):
            t = tool(t)
        if t.name in self._tools:
            raise ToolError(f"a tool named {t.name!r} is already registered")
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name) or next(
            (t for n, t in self._tools.items() if n.lower() == name.lower()), None
        )

    def names(self) -> list[str]:
        return list(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def describe(self) -> str:
        return "\n".join(t.describe() for t in self)
