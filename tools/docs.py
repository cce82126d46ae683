"""``search[entity]``, ``lookup[keyword]`` and ``finish[answer]`` over an index.

The semantics of the ReAct paper's Wikipedia environment, on the user's own documents:
``search`` finds a document whose title is the entity (exactly, then ignoring case and
punctuation) and shows its first sentences, or lists similar titles from hybrid search; the
found document becomes the current one. ``lookup`` walks the current document's sentences that
contain a keyword, one per call. One ``DocumentExplorer`` per episode: it holds that state.
"""

from __future__ import annotations

import re

from agentkit.retrievers import Index
from agentkit.tools.registry import Tool, tool

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
# "c. 1829", "James J. Andrews", "Dr. Braun", "e.g. this": a full stop that ends no sentence
ABBREVIATION = re.compile(r"(?:\b[A-Za-z]|\b(?:Dr|Mr|Mrs|Ms|St|Jr|Sr|vs|etc|No|Mt|Inc|Co|ca))\.$")
FIRST_SENTENCES = 5


def normalize_title(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.casefold()))


def sentences(text: str) -> list[str]:
    out: list[str] = []
    for piece in SENTENCE_END.split(" ".join(text.split())):
        if out and ABBREVIATION.search(out[-1]):
            out[-1] = f"{out[-1]} {piece}"
        elif piece.strip():
            out.append(piece.strip())
    return out


TitleMaps = tuple[dict[int, str], dict[str, int], dict[str, int]]
_TITLES: dict[str, tuple[tuple[int, int], TitleMaps]] = {}


def title_maps(index: Index) -> TitleMaps:
    """Titles by document id, and document ids by exact and by normalised title, read once per
    index version rather than once per episode (an API serves many episodes over one index)."""
    version = index.version()
    cached = _TITLES.get(str(index.path))
    if cached is None or cached[0] != version:
        titles = index.titles()
        loose: dict[str, int] = {}
        for doc_id, title in titles.items():
            loose.setdefault(normalize_title(title), doc_id)
        exact = {title: doc_id for doc_id, title in titles.items()}
        cached = _TITLES[str(index.path)] = (version, (titles, exact, loose))
    return cached[1]


class DocumentExplorer:
    """The per-episode state behind search/lookup: the current document and lookup cursor."""

    def __init__(self, index: Index, *, similar: int = 5) -> None:
        self.index, self.similar = index, similar
        self.current: str | None = None
        self._sentences: list[str] = []
        self._keyword: str | None = None
        self._matches: list[str] = []
        self._cursor = 0
        self._titles, self._exact, self._loose = title_maps(index)

    def search(self, entity: str) -> str:
        entity = entity.strip().strip("\"'")
        doc_id = self._exact.get(entity) or self._loose.get(normalize_title(entity))
        if doc_id is None:
            hits = self.index.search(entity, k=self.similar * 2) if entity else []
            titles = list(dict.fromkeys(h.title for h in hits))[: self.similar]
            return f"Could not find [{entity}]. Similar: {titles}."
        title = self._titles[doc_id]
        self.current = title
        self._sentences = sentences(self.index.document_text(doc_id))
        self._keyword = None
        return " ".join(self._sentences[:FIRST_SENTENCES]) or f"[{title}] is empty."

    def lookup(self, keyword: str) -> str:
        if self.current is None:
            return "No current document: search[entity] for one first."
        keyword = keyword.strip()
        if keyword.casefold() != (self._keyword or "").casefold():
            self._keyword = keyword
            self._matches = [s for s in self._sentences if keyword.casefold() in s.casefold()]
            self._cursor = 0
        if self._cursor >= len(self._matches):
            return "No more results."
        self._cursor += 1
        return f"(Result {self._cursor} / {len(self._matches)}) {self._matches[self._cursor - 1]}"

    def tools(self) -> list[Tool]:
        """``search``, ``lookup`` and ``finish`` bound to this explorer."""

        @tool(name="search")
        def search(entity: str) -> str:
            """search[entity]: the start of the document titled entity, or similar titles."""
            return self.search(entity)

        @tool(name="lookup")
        def lookup(keyword: str) -> str:
            """lookup[keyword]: the next sentence with keyword in the current document."""
            return self.lookup(keyword)

        return [search, lookup, finish]


@tool
def finish(answer: str) -> str:
    """finish[answer]: give the final answer and end."""
    return answer
