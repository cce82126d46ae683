"""agentkit as an MCP server: ``agentkit mcp`` (stdio) and ``/mcp`` on ``agentkit serve``.

Tools ``search`` (hits with citations), ``ask`` (a RAG answer citing them), ``solve`` (PAL: a
program and its value) and ``react`` (an answer and its steps), each a thin shell over the one
agent runner, so guardrails and settings apply as everywhere else; the index's documents are
resources (``agentkit://documents/<source>``). Bad input (an unknown tool, arguments that fail
the schema, an empty index, a model server that is down) is an MCP error result whose message
says what to do; the server stays up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Annotated, Any
from urllib.parse import quote, unquote

import anyio
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp_types import Resource
from pydantic import BaseModel, Field

from agentkit.agents import AgentContext, AgentRequest, run_agent
from agentkit.errors import AgentkitError

DOCUMENTS = "agentkit://documents/"
INSTRUCTIONS = (
    "Tools over a document index and a sandboxed Python interpreter. Use `search` to find "
    "passages, `ask` for an answer that cites them, `solve` for arithmetic and word problems "
    "(it writes and runs a program), `react` for questions that need several searches."
)

Question = Annotated[str, Field(min_length=1, max_length=4000, description="The question.")]


class Source(BaseModel):
    number: int = Field(description="What [n] in the answer refers to.")
    source: str = Field(description="The document, as indexed; read it as a resource.")
    location: str = Field(description="Where in the document: path:line or path#page=N.")
    title: str
    heading: str
    text: str = Field(description="The passage.")


class SearchResult(BaseModel):
    hits: list[Source] = Field(description="Best first.")


class AskResult(BaseModel):
    answer: str = Field(description="The answer; [n] cites citations[n-1].")
    answered: bool = Field(description="False when the sources do not contain the answer.")
    citations: list[Source]


class SolveResult(BaseModel):
    ok: bool = Field(description="Whether the program ran and returned a value.")
    value: str | None = Field(description="The program's return value (as text), the answer.")
    program: str | None = Field(description="The Python program that produced it.")
    error: str | None = Field(description="Why it failed, when it did.")


class ReactStep(BaseModel):
    thought: str
    action: str | None
    argument: str
    observation: str


class ReactResult(BaseModel):
    answer: str
    finished: bool = Field(description="False when the agent ran out of steps.")
    fallback: bool = Field(description="True when a plain RAG answer replaced it at the limit.")
    steps: list[ReactStep]


class AgentkitMCP(MCPServer):
    """The MCP server over one ``AgentContext``; documents as resources."""

    def __init__(self, context: AgentContext, relative: Callable[[str], str] = str) -> None:
        # MCPServer configures the root logger (a rich handler, at its level). Given the level
        # the root already has, that changes nothing: at its default (INFO) every httpx call of
        # every request was logged and rendered, ~9% of the API's CPU under chat load.
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        super().__init__("agentkit", instructions=INSTRUCTIONS, version="0.1.0", log_level=level)
        self.context, self.relative = context, relative
        for function in (self.search, self.ask, self.solve, self.react):
            self.add_tool(function, structured_output=True)

    # --- tools -------------------------------------------------------------------------------

    async def search(
        self,
        query: Annotated[str, Field(min_length=1, max_length=4000, description="What to find.")],
        k: Annotated[int, Field(ge=1, le=20, description="How many passages.")] = 5,
    ) -> SearchResult:
        """Search the document index (hybrid: meaning and keywords) for passages about the query;
        each hit names its document and place, for citing."""
        index = self._index()
        hits = await self._run(lambda: index.search(query, k=k))
        return SearchResult(hits=[self._source(n, hit) for n, hit in enumerate(hits, 1)])

    async def ask(self, question: Question) -> AskResult:
        """Answer a question from the indexed documents, citing the passages used as [n]; says
        so when the documents do not contain the answer."""
        self._index()
        result = await self._agent("agentkit-rag", question)
        citations = result.data.get("citations") or []
        return AskResult(
            answer=self.relative(result.text),
            answered=bool(result.data.get("answered", True)),
            citations=[self._citation(c) for c in citations],
        )

    async def solve(
        self,
        problem: Annotated[
            str, Field(min_length=1, max_length=4000, description="A math or word problem.")
        ],
    ) -> SolveResult:
        """Solve a math or word problem by writing a Python program and running it in a sandbox;
        returns the value and the program (check it)."""
        result = await self._agent("agentkit-pal", problem)
        pal = result.data.get("pal") or {}
        value = pal.get("answer")
        return SolveResult(
            ok=value is not None,
            value=None if value is None else str(value),
            program=pal.get("program"),
            error=pal.get("error"),
        )

    async def react(self, question: Question) -> ReactResult:
        """Answer a question that needs several steps (search, look up, search again) over the
        indexed documents; returns the answer and every step taken."""
        self._index()
        result = await self._agent("agentkit-react", question)
        trajectory = result.data.get("react") or {}
        return ReactResult(
            answer=self.relative(result.text),
            finished=bool(trajectory.get("finished")),
            fallback=bool(trajectory.get("fallback")),
            steps=[
                ReactStep(
                    thought=s["thought"],
                    action=s["action"],
                    argument=s["argument"],
                    observation=self.relative(s["observation"]),
                )
                for s in trajectory.get("steps", [])
            ],
        )

    # --- resources -----------------------------------------------------------------------------

    async def list_resources(self) -> list[Resource]:
        index = self.context.index
        if index is None:
            return []
        documents = await self._run(index.documents)
        return [
            Resource(
                uri=DOCUMENTS + quote(d["source"], safe="/"),
                name=d["source"],
                title=d["title"] or d["source"],
                description=f"An indexed {d['format']} document ({d['chunks']} chunks).",
                mime_type="text/plain",
            )
            for d in documents
        ]

    async def read_resource(self, uri: Any, context: Any = None) -> Iterable[ReadResourceContents]:
        text = str(uri)
        index = self.context.index
        if not text.startswith(DOCUMENTS) or index is None:
            raise ResourceNotFoundError(f"no resource {text}: list the resources for the URIs")
        source = unquote(text[len(DOCUMENTS) :])

        def read() -> str | None:
            with index.lock.reading():
                ids = index.follow_disk().document_ids(source)
            return index.document_text(ids[0]) if ids else None

        body = await self._run(read)
        if body is None:
            raise ResourceNotFoundError(f"no document {source!r} in the index")
        return [ReadResourceContents(content=body, mime_type="text/plain")]

    # --- helpers -------------------------------------------------------------------------------

    def _index(self) -> Any:
        index = self.context.index
        if index is None:
            raise ToolError("this server has no index: start it with --index, or index a folder")
        if index.stats().get("documents", 0) == 0:
            raise ToolError(
                "the index is empty: add documents (`agentkit index FOLDER`, or POST "
                "/v1/documents on the API) and ask again"
            )
        return index

    async def _agent(self, name: str, question: str) -> Any:
        request = AgentRequest.ask(question)
        return await self._run(lambda: run_agent(name, self.context, request))

    async def _run(self, work: Callable[[], Any]) -> Any:
        """``work`` in a worker thread, its agentkit errors as MCP tool errors."""
        try:
            return await anyio.to_thread.run_sync(work)
        except AgentkitError as error:
            raise ToolError(self.relative(str(error))) from None

    def _source(self, number: int, hit: Any) -> Source:
        return Source(
            number=number,
            source=hit.source,
            location=self.relative(hit.location),
            title=hit.title,
            heading=hit.heading,
            text=hit.text,
        )

    def _citation(self, c: dict[str, Any]) -> Source:
        return Source(
            number=c["number"],
            source=c["source"],
            location=self.relative(c["location"]),
            title=c["title"],
            heading=c["heading"],
            text=c["text"],
        )


def create_mcp_server(context: AgentContext, relative: Callable[[str], str] = str) -> AgentkitMCP:
    """The MCP server over ``context``; ``relative`` hides server paths in what it returns."""
    return AgentkitMCP(context, relative)
