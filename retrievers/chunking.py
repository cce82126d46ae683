"""Split documents into chunks sized in tokens of the embedding model.

Markdown is split at headings first (the heading path is kept with each chunk); every section,
and every other format, then goes through langchain's recursive splitter with overlap. A final
check re-tokenises each chunk with its title prefix, and cuts at token boundaries whatever would
still exceed the model's maximum sequence length, so nothing is ever silently truncated.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from .types import ChunkSpan, LoadedDocument

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_ATTRIBUTES = re.compile(r"\s*\{\s*[#.][^}]*\}\s*$")  # `## Title { #anchor }` (attr_list, Pandoc)
_FENCE = re.compile(r"^[ \t]*(```|~~~)")
MAX_PREFIX_TOKENS = 48
MARKDOWN_SEPARATORS = RecursiveCharacterTextSplitter.get_separators_for_language(Language.MARKDOWN)
TEXT_SEPARATORS = ["\n\n", "\n", ". ", "。", " ", ""]


class TokenCounter:
    """Counts and cuts text in tokens of a fast tokenizer (``tokenizers.Tokenizer``)."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - a tokenizers.Tokenizer
        self._tokenizer = tokenizer

    def count(self, text: str) -> int:
        """Tokens of ``text`` without the special tokens."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def cut(self, text: str, max_tokens: int) -> list[str]:
        """``text`` cut at token boundaries into pieces of at most ``max_tokens`` tokens."""
        offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        pieces, start = [], 0
        for i in range(max_tokens, len(offsets), max_tokens):
            end = offsets[i][0]
            pieces.append(text[start:end])
            start = end
        pieces.append(text[start:])
        return [p for p in pieces if p.strip()]


@dataclass
class Section:
    heading: str
    text: str
    start: int


def heading_title(text: str) -> str:
    """A heading's text without a trailing attribute list such as ``{ #anchor }``."""
    return _ATTRIBUTES.sub("", text).strip() or text.strip()


def markdown_sections(text: str) -> list[Section]:
    """Split Markdown at ATX headings outside code fences; each section keeps its heading line."""
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    start, in_fence, offset = 0, False, 0
    heading = ""
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line.rstrip("\r\n"))
        if match:
            if text[start:offset].strip():
                sections.append(Section(heading, text[start:offset], start))
            level = len(match.group(1))
            title = heading_title(match.group(2))
            path = [(lvl, h) for lvl, h in path if lvl < level] + [(level, title)]
            heading = " > ".join(h for _, h in path)
            start = offset
        offset += len(line)
    if text[start:].strip():
        sections.append(Section(heading, text[start:], start))
    return sections


def chunk_prefix(title: str, heading: str, counter: TokenCounter) -> str:
    """The context line embedded before a chunk: its title and heading path, capped in tokens.

    A heading path that starts with the title (the usual H1) is not preceded by it again.
    """
    if not heading:
        prefix = title
    elif heading == title or heading.startswith(f"{title} > "):
        prefix = heading
    else:
        prefix = f"{title} > {heading}"
    if counter.count(prefix) > MAX_PREFIX_TOKENS:
        prefix = counter.cut(prefix, MAX_PREFIX_TOKENS)[0]
    return prefix.strip()


def embedding_text(prefix: str, text: str) -> str:
    return f"{prefix}\n{text}" if prefix else text


def chunk_document(
    doc: LoadedDocument,
    counter: TokenCounter,
    *,
    max_tokens: int,
    overlap_tokens: int,
    special_tokens: int = 2,
) -> list[ChunkSpan]:
    """Chunks of ``doc`` whose embedding text (prefix + chunk) fits in ``max_tokens``."""
    is_markdown = doc.format in ("md", "markdown")
    sections = markdown_sections(doc.text) if is_markdown else [Section("", doc.text, 0)]
    separators = MARKDOWN_SEPARATORS if is_markdown else TEXT_SEPARATORS
    chunks: list[ChunkSpan] = []
    for section in sections:
        prefix = chunk_prefix(doc.title, section.heading, counter)
        budget = max_tokens - special_tokens - (counter.count(prefix) + 1 if prefix else 0)
        splitter = RecursiveCharacterTextSplitter(
            chunk_size=budget,
            chunk_overlap=min(overlap_tokens, budget // 4),
            length_function=counter.count,
            separators=separators,
            keep_separator=True,
        )
        cursor = 0
        for piece in splitter.split_text(section.text):
            for part in _fit(piece, prefix, counter, max_tokens - special_tokens):
                found = section.text.find(part, cursor)
                start = found if found >= 0 else cursor
                cursor = start + 1
                chunks.append(
                    ChunkSpan(
                        text=part,
                        heading=section.heading,
                        char_start=section.start + start,
                        char_end=section.start + start + len(part),
                        n_tokens=counter.count(embedding_text(prefix, part)),
                        prefix=prefix,
                    )
                )
    return chunks


def _fit(piece: str, prefix: str, counter: TokenCounter, limit: int) -> list[str]:
    """``piece`` as is when its embedding text fits ``limit`` tokens, else cut at token boundaries.

    Tokenising a cut piece on its own can differ by a token from its place in the whole, so the
    cut size shrinks until every part fits.
    """

    def fits(text: str) -> bool:
        return counter.count(embedding_text(prefix, text)) <= limit

    if fits(piece):
        return [piece]
    size = limit - (counter.count(prefix) + 1 if prefix else 0)
    while True:
        parts = [p.strip() for p in counter.cut(piece, max(size, 1))]
        parts = [p for p in parts if p]
        if all(fits(p) for p in parts) or size <= 1:
            return parts
        size -= max(1, size // 8)


def line_number(line_starts: list[int], offset: int) -> int:
    """1-based line of a character offset, given the offsets at which lines start."""
    return bisect.bisect_right(line_starts, offset)


def line_starts_of(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer("\n", text)]
