"""Split documents into chunks sized in tokens of the embedding model.

Markdown is split at headings first (the heading path is kept with each chunk); every section,
and every other format, then goes through langchain's recursive splitter with overlap. A line
too long for one chunk (a single-line file, a minified page) is cut on its own by token windows,
at sentence ends or spaces, and the splitter sees the rest in blocks of bounded size: time and
memory stay linear in the document. A final check re-tokenises each chunk with its title
prefix, and cuts at token boundaries whatever would still exceed the model's maximum sequence
length, so nothing is ever silently truncated. Markdown chunks are embedded through
``markdown_view``: the text without link targets and markup, a third fewer tokens to embed.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass

from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from .types import ChunkSpan, LoadedDocument

_HEADING = re.compile(r"(#{1,6})[ \t]")  # then the title: see heading_of
_ATTRIBUTE_LIST = r"\{\s*[#.][^}\n]*\}"  # `## Title { #anchor }` (attr_list, Pandoc)
_ATTRIBUTES = re.compile(_ATTRIBUTE_LIST + r"\s*$")
_FENCE = re.compile(r"^[ \t]*(```|~~~)")
# What the embedding model reads of Markdown: link text without its target, images by their alt
# text, no heading attribute lists, no inline HTML tags (their text stays). URLs are ~30% of the
# tokens of a documentation folder (fastapi-docs/en: 157k of 517k) and mean nothing to a
# sentence embedder; the stored chunk, its citation and the keyword index keep them.
_LINK_TARGET = re.compile(
    r"(!?\[(?:[^\[\]\n]|\[[^\[\]\n]*\])*\])\(((?:[^()\s]|\([^()\s]*\))+)(?:\s+\"[^\"\n]*\")?\)"
)
_REFERENCE_DEFINITION = re.compile(r"^[ \t]{0,3}\[[^\]\n]+\]:[ \t]*\S+.*$", re.MULTILINE)
_HEADING_ATTRIBUTES = re.compile(r"[ \t]*" + _ATTRIBUTE_LIST + r"[ \t]*$", re.MULTILINE)
_INLINE_TAG = re.compile(
    r"</?(?:a|abbr|img|span|div|sup|sub|small|strong|em|b|i|u|br|p|font|kbd|mark|details|summary)"
    r"(?:\s[^<>]*)?/?>",
    re.IGNORECASE,
)
_URL = re.compile(r"<?https?://[^\s<>)\]]+>?")
MAX_PREFIX_TOKENS = 48
MAX_TITLE_CHARS = 200  # longer titles and headings are cut (a 50 MB "# ..." line is no title)
MAX_CHARS_PER_TOKEN = 8  # a chunk holds at most budget * this many characters
LONG_LINE_CHARS_PER_TOKEN = 4  # longer lines (budget * this) are cut by cut_long_line
BLOCK_CHARS = 1 << 16  # the splitter sees at most about this much text at once
WINDOW_CHARS = 1 << 16  # a long line is tokenised this much at a time
_SENTENCE_ENDS = (". ", "! ", "? ", "。", "！", "？")
MARKDOWN_SEPARATORS = RecursiveCharacterTextSplitter.get_separators_for_language(Language.MARKDOWN)
TEXT_SEPARATORS = ["\n\n", "\n", ". ", "。", " ", ""]


class TokenCounter:
    """Counts and cuts text in tokens of a fast tokenizer (``tokenizers.Tokenizer``)."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - a tokenizers.Tokenizer
        self._tokenizer = tokenizer

    def count(self, text: str) -> int:
        """Tokens of ``text`` without the special tokens."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def starts(self, text: str) -> list[int]:
        """The character offsets at which the tokens of ``text`` start."""
        return [
            start for start, _ in self._tokenizer.encode(text, add_special_tokens=False).offsets
        ]

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
    """A heading's text without a trailing attribute list such as ``{ #anchor }``, at most
    ``MAX_TITLE_CHARS`` long."""
    text = text.strip()
    if len(text) > MAX_TITLE_CHARS:
        return text[:MAX_TITLE_CHARS].rstrip() + "…"
    brace = text.rfind("{")
    if brace > 0 and _ATTRIBUTES.match(text, brace):
        return text[:brace].strip() or text
    return text


def heading_of(line: str) -> tuple[int, str] | None:
    """``(level, title)`` of an ATX heading line (``## Title ##``), else None.

    The closing hashes are stripped by hand: a backtracking regex takes cubic time on a
    heading followed by a long run of spaces.
    """
    match = _HEADING.match(line)
    rest = line[match.end() :].rstrip("\r\n") if match else ""
    if not rest:
        return None
    title = rest.rstrip(" \t").rstrip("#").rstrip(" \t") or rest
    return len(match.group(1)), heading_title(title)


def markdown_sections(text: str) -> list[Section]:
    """Split Markdown at ATX headings outside code fences; each section keeps its heading line."""
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    start, in_fence, offset = 0, False, 0
    heading = ""
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            in_fence = not in_fence
        parsed = None if in_fence else heading_of(line)
        if parsed:
            if text[start:offset].strip():
                sections.append(Section(heading, text[start:offset], start))
            level, title = parsed
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


def _link_text(match: re.Match[str]) -> str:
    """A link's text, or the match unchanged when its "target" is no path, URL or anchor
    (``handlers[0](event)`` in code)."""
    if not any(mark in match.group(2) for mark in "/.#:"):
        return match.group(0)
    return match.group(1).lstrip("!")[1:-1]


def markdown_view(text: str) -> str:
    """``text`` as the embedding model should read it: Markdown without link targets, image
    sources, reference definitions, heading attributes, inline HTML tags and bare URLs ("" when
    nothing changes, or nothing would be left)."""
    view = _LINK_TARGET.sub(_link_text, text)
    view = _REFERENCE_DEFINITION.sub("", view)
    view = _HEADING_ATTRIBUTES.sub("", view)
    view = _INLINE_TAG.sub("", view)
    view = _URL.sub("", view)
    return view if view != text and view.strip() else ""


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
    return list(
        iter_chunks(
            doc,
            counter,
            max_tokens=max_tokens,
            overlap_tokens=overlap_tokens,
            special_tokens=special_tokens,
        )
    )


def iter_chunks(
    doc: LoadedDocument,
    counter: TokenCounter,
    *,
    max_tokens: int,
    overlap_tokens: int,
    special_tokens: int = 2,
) -> Iterator[ChunkSpan]:
    """The chunks of ``chunk_document``, one at a time, in document order."""
    is_markdown = doc.format in ("md", "markdown")
    sections = markdown_sections(doc.text) if is_markdown else [Section("", doc.text, 0)]
    separators = MARKDOWN_SEPARATORS if is_markdown else TEXT_SEPARATORS
    limit = max_tokens - special_tokens
    count = memoized_count(counter)
    for section in sections:
        prefix = chunk_prefix(doc.title, section.heading, counter)
        budget = max(1, limit - (counter.count(prefix) + 1 if prefix else 0))
        overlap = min(overlap_tokens, budget // 4)
        splitter = RecursiveCharacterTextSplitter(
            chunk_size=budget,
            chunk_overlap=overlap,
            length_function=count,
            separators=separators,
            keep_separator=True,
        )
        for offset, block, is_long_line in text_blocks(section.text, budget):
            if is_long_line:
                pieces = cut_long_line(block, counter, budget, overlap)
            else:
                pieces = _located(block, splitter.split_text(block))
            for start, piece in pieces:
                cursor = 0
                for part, n_tokens in _fit(piece, prefix, counter, limit):
                    found = piece.find(part, cursor)
                    at = found if found >= 0 else cursor
                    cursor = at + len(part)
                    char_start = section.start + offset + start + at
                    view = markdown_view(part) if is_markdown else ""
                    yield ChunkSpan(
                        text=part,
                        heading=section.heading,
                        char_start=char_start,
                        char_end=char_start + len(part),
                        n_tokens=count(embedding_text(prefix, view)) if view else n_tokens,
                        prefix=prefix,
                        view=view,
                    )


def text_blocks(text: str, budget: int) -> Iterator[tuple[int, str, bool]]:
    """``text`` in order as ``(offset, piece, is_long_line)``: every line longer than ``budget *
    LONG_LINE_CHARS_PER_TOKEN`` characters on its own, and the lines between them in blocks of
    about ``BLOCK_CHARS`` at most (cut after a blank line where there is one). A short text
    without long lines is one block."""
    block_start, paragraph_end, pos = 0, -1, 0
    long_chars = budget * LONG_LINE_CHARS_PER_TOKEN
    while pos < len(text):
        newline = text.find("\n", pos)
        line_end = len(text) if newline < 0 else newline + 1
        if line_end - pos > long_chars:
            if pos > block_start:
                yield block_start, text[block_start:pos], False
            yield pos, text[pos:line_end], True
            block_start = pos = line_end
            paragraph_end = -1
            continue
        if line_end - block_start > BLOCK_CHARS and pos > block_start:
            cut = paragraph_end if paragraph_end > block_start else pos
            yield block_start, text[block_start:cut], False
            block_start, paragraph_end = cut, -1
        if not text[pos:line_end].strip():
            paragraph_end = line_end
        pos = line_end
    if block_start < len(text):
        yield block_start, text[block_start:], False


def memoized_count(counter: TokenCounter, max_chars: int = 256, size: int = 8192):  # noqa: ANN201
    """``counter.count`` remembering short texts: the splitter counts the same words and
    separators over and over (bounded: at most ``size`` texts of ``max_chars``)."""
    known: dict[str, int] = {}

    def count(text: str) -> int:
        if len(text) > max_chars:
            return counter.count(text)
        tokens = known.get(text)
        if tokens is None:
            if len(known) >= size:
                known.clear()
            tokens = known[text] = counter.count(text)
        return tokens

    return count


def _located(block: str, pieces: list[str]) -> Iterator[tuple[int, str]]:
    """The splitter's pieces with their offsets in ``block`` (they overlap, in order)."""
    cursor = 0
    for piece in pieces:
        found = block.find(piece, cursor)
        start = found if found >= 0 else cursor
        cursor = start + 1
        yield start, piece


def token_starts(counter: TokenCounter, text: str) -> list[int]:
    """The offsets at which the tokens of ``text`` start (through ``cut`` for counters that
    cannot tell)."""
    starts = getattr(counter, "starts", None)
    if starts is not None:
        return starts(text)
    offsets, cursor = [], 0
    for piece in counter.cut(text, 1):
        cursor = text.find(piece, cursor)
        offsets.append(cursor)
        cursor += len(piece)
    return offsets


def cut_long_line(
    line: str, counter: TokenCounter, budget: int, overlap: int
) -> Iterator[tuple[int, str]]:
    """``(offset, piece)`` chunks of a line too long for one: each at most ``budget`` tokens and
    ``budget * MAX_CHARS_PER_TOKEN`` characters, ending after a sentence or before a space when
    one lies in its second half, about ``overlap`` tokens shared with the next.

    The line is tokenised a window at a time, so time and memory are linear in its length.
    """
    max_chars = budget * MAX_CHARS_PER_TOKEN
    window_chars = max(WINDOW_CHARS, 4 * max_chars)
    base = 0  # where the current window starts in ``line``
    while base < len(line):
        window = line[base : base + window_chars]
        last_window = base + len(window) >= len(line)
        starts = token_starts(counter, window)
        local = 0
        while True:
            while local < len(window) and window[local].isspace():
                local += 1
            if local >= len(window) or (not last_window and local + max_chars > len(window)):
                break
            first = bisect.bisect_left(starts, local)
            end = starts[first + budget] if first + budget < len(starts) else len(window)
            end = min(end, local + max_chars)
            if end < len(window) or not last_window:
                end = _sentence_or_word_end(window, local, end)
            yield base + local, window[local:end].rstrip()
            if last_window and end >= len(window):
                local = len(window)
                break
            # The next chunk starts ``overlap`` tokens back, but at most a quarter of this chunk
            # back (every chunk moves on by most of its length), at the start of a word.
            back = bisect.bisect_left(starts, end) - overlap
            following = max(starts[back] if back > first else end, end - (end - local) // 4)
            if following < end and not window[following - 1].isspace():
                space = window.find(" ", following, end)
                following = space + 1 if space >= 0 else following
            local = max(following, local + 1)
        base += local
        if last_window:
            break


def _sentence_or_word_end(text: str, start: int, end: int) -> int:
    """Where to end a chunk ``text[start:end]``: after the last sentence end, else at the last
    space, in its second half; ``end`` when there is neither."""
    middle = start + (end - start) // 2
    sentence = max(text.rfind(mark, middle, end) for mark in _SENTENCE_ENDS)
    if sentence >= 0:
        return sentence + 1
    space = max(text.rfind(" ", middle, end), text.rfind("\t", middle, end))
    return space if space > middle else end


def _fit(piece: str, prefix: str, counter: TokenCounter, limit: int) -> list[tuple[str, int]]:
    """``piece`` as is when its embedding text fits ``limit`` tokens, else cut at token
    boundaries; each part with the tokens of its embedding text.

    Tokenising a cut piece on its own can differ by a token from its place in the whole, so the
    cut size shrinks until every part fits.
    """
    n_tokens = counter.count(embedding_text(prefix, piece))
    if n_tokens <= limit:
        return [(piece, n_tokens)]
    size = limit - (counter.count(prefix) + 1 if prefix else 0)
    while True:
        parts = [p.strip() for p in counter.cut(piece, max(size, 1))]
        counted = [(p, counter.count(embedding_text(prefix, p))) for p in parts if p]
        if all(n <= limit for _, n in counted) or size <= 1:
            return counted
        size -= max(1, size // 8)


def line_number(line_starts: list[int], offset: int) -> int:
    """1-based line of a character offset, given the offsets at which lines start."""
    return bisect.bisect_right(line_starts, offset)


def line_starts_of(text: str, separator: str = "\n") -> list[int]:
    """The offsets at which lines (or pages, with ``separator="\\f"``) start."""
    return [0] + [m.end() for m in re.finditer(re.escape(separator), text)]
