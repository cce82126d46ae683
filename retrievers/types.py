"""Plain data passed between the retrieval steps; all of it serialises to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LoadedDocument:
    """A file (or any text) ready to be chunked. ``source`` is unique within ``root``."""

    source: str
    text: str
    title: str
    format: str
    content_hash: str
    root: str = ""
    has_lines: bool = True
    warnings: list[str] = field(default_factory=list)


@dataclass
class ChunkSpan:
    """A piece of a document, as it will be embedded and cited."""

    text: str
    heading: str
    char_start: int
    char_end: int
    n_tokens: int
    prefix: str = ""
    view: str = ""  # the chunk as the model reads it, where that differs from ``text``

    @property
    def embedding_text(self) -> str:
        """What the model embeds: the title/heading line, then the chunk (or its ``view``)."""
        body = self.view or self.text
        return f"{self.prefix}\n{body}" if self.prefix else body


@dataclass
class Hit:
    """One search result, with everything a citation needs."""

    chunk_id: int
    score: float
    text: str
    source: str
    path: str
    title: str
    heading: str
    char_start: int
    char_end: int
    line_start: int | None = None
    line_end: int | None = None
    page: int | None = None
    dense_rank: int | None = None
    bm25_rank: int | None = None
    similarity: float | None = None  # cosine similarity to the query, when in the dense top-n

    @property
    def location(self) -> str:
        """``path:line`` (or ``path#page=N``, or just the path) for display."""
        if self.line_start is not None:
            return f"{self.path}:{self.line_start}"
        if self.page is not None:
            return f"{self.path}#page={self.page}"
        return self.path

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "location": self.location}


@dataclass
class SyncSummary:
    """What one indexing run did."""

    index: str
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: int = 0
    chunks_embedded: int = 0
    chunks_total: int = 0
    documents_total: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chunks_per_second": round(self.chunks_per_second, 2)}
