"""Chunks fit the embedding model: sized in its tokens, never silently truncated."""

from __future__ import annotations

import random
import time

import pytest
from tokenizers import Tokenizer

from agentkit.retrievers.chunking import (
    MAX_TITLE_CHARS,
    TokenCounter,
    chunk_document,
    chunk_prefix,
    markdown_sections,
)
from agentkit.retrievers.embedding import resolve_model_path
from agentkit.retrievers.types import LoadedDocument
from agentkit.settings import DEFAULT_EMBEDDING_MODEL

MAX_TOKENS = 256


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tokenizer = Tokenizer.from_file(f"{resolve_model_path(DEFAULT_EMBEDDING_MODEL)}/tokenizer.json")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def document(text: str, fmt: str = "md", title: str = "A title") -> LoadedDocument:
    return LoadedDocument(source=f"doc.{fmt}", text=text, title=title, format=fmt, content_hash="h")


LONG_LINE = "supercalifragilistic" * 3000
CODE = "\n".join(
    f"    result_{i} = compute_value(alpha={i}, beta=[{i}, {i + 1}], gamma='x')" for i in range(400)
)
CJK = (
    "检索增强生成将文档检索与语言模型结合起来。" * 600
    + "日本語の文章もここに含まれています。" * 300
)


@pytest.mark.parametrize(
    "text, fmt",
    [
        (LONG_LINE, "txt"),
        ("# Code\n\n```python\n" + CODE + "\n```\n", "md"),
        (CJK, "txt"),
        ("# 标题\n\n" + CJK, "md"),
        ("word " * 20000, "rst"),
    ],
    ids=["long-line", "code", "cjk", "cjk-markdown", "many-words"],
)
def test_every_chunk_fits_the_model_with_its_prefix(
    tokenizer: Tokenizer, text: str, fmt: str
) -> None:
    doc = document(text, fmt)
    chunks = chunk_document(doc, TokenCounter(tokenizer), max_tokens=MAX_TOKENS, overlap_tokens=32)
    assert len(chunks) > 5
    for chunk in chunks:
        ids = tokenizer.encode(chunk.embedding_text, add_special_tokens=True).ids
        assert len(ids) <= MAX_TOKENS, f"chunk of {len(ids)} tokens would be truncated"
        assert doc.text[chunk.char_start : chunk.char_end] == chunk.text
    covered = "".join(c.text for c in chunks)
    assert len(covered) >= len(text.strip()) * 0.99  # nothing dropped


def test_markdown_chunks_carry_their_heading_path(tokenizer: Tokenizer) -> None:
    text = (
        "# Guide\n\nIntro.\n\n## Install { #install }\n\nRun pip.\n\n"
        "```bash\n# not a heading\npip install x\n```\n\n"
        "### Linux\n\nUse apt.\n\n## Use\n\nCall it.\n"
    )
    chunks = chunk_document(
        document(text), TokenCounter(tokenizer), max_tokens=64, overlap_tokens=0
    )
    by_heading = {c.heading: c.text for c in chunks}
    assert list(by_heading) == [
        "Guide",
        "Guide > Install",
        "Guide > Install > Linux",
        "Guide > Use",
    ]
    assert "# not a heading" in by_heading["Guide > Install"]
    assert by_heading["Guide > Use"].startswith("## Use")


@pytest.mark.parametrize(
    "title, heading, prefix",
    [
        ("Guide", "Guide > Install", "Guide > Install"),  # the H1 is the title: not said twice
        ("Guide", "Guide", "Guide"),
        ("Guide", "", "Guide"),
        ("Front matter title", "Install", "Front matter title > Install"),
        ("Guide", "Guidelines", "Guide > Guidelines"),  # a prefix of words, not of the path
    ],
)
def test_chunk_prefix_names_title_and_heading_path_once(
    tokenizer: Tokenizer, title: str, heading: str, prefix: str
) -> None:
    assert chunk_prefix(title, heading, TokenCounter(tokenizer)) == prefix


def test_text_before_the_first_heading_is_kept() -> None:
    sections = markdown_sections("Preamble line.\n\n# First\n\nBody.\n")
    assert [(s.heading, s.text.strip()) for s in sections] == [
        ("", "Preamble line."),
        ("First", "# First\n\nBody."),
    ]


def prose(chars: int, seed: int = 0) -> str:
    """Sentences of common words on one line, about ``chars`` long."""
    rng = random.Random(seed)
    vocabulary = ["retrieval", "joins", "a", "search", "index", "to", "the", "model", "of", "docs"]
    words, size = [], 0
    while size < chars:
        words.append(rng.choice(vocabulary) + ("." if rng.random() < 0.08 else ""))
        size += len(words[-1]) + 1
    return " ".join(words)


SHAPES = {
    "single-line": lambda n: (prose(n), "md"),
    "heading-with-spaces": lambda n: ("# Title" + " " * (n // 100) + "x\n\n" + prose(n), "md"),
    "no-spaces": lambda n: ("".join(random.Random(1).choices("abcdefghij", k=n)), "txt"),
    "paragraphs": lambda n: ("\n\n".join(prose(300, i) for i in range(n // 300)), "md"),
    # hostile input for the Markdown view's link and tag patterns: nothing ever closes
    "unclosed-links": lambda n: ("[a[b](c/d(e " * (n // 12), "md"),
    "unclosed-tags": lambda n: ("<a href=x <span " * (n // 16), "md"),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_chunking_time_grows_linearly_with_the_document(tokenizer: Tokenizer, shape) -> None:
    def seconds(chars: int, runs: int) -> float:
        text, fmt = shape(chars)
        best = float("inf")
        for _ in range(runs):
            started = time.process_time()
            chunks = chunk_document(
                document(text, fmt), TokenCounter(tokenizer), max_tokens=256, overlap_tokens=32
            )
            best = min(best, time.process_time() - started)
        assert chunks
        return best

    small, large = seconds(30_000, 3), seconds(240_000, 2)
    assert large < 20 * small, f"8x the text took {large / small:.0f}x the time"


def test_a_long_line_is_cut_between_sentences_or_words(tokenizer: Tokenizer) -> None:
    text = prose(60_000)
    chunks = chunk_document(
        document(text, "md"), TokenCounter(tokenizer), max_tokens=MAX_TOKENS, overlap_tokens=32
    )
    assert len(chunks) > 50
    for before, after in zip(chunks, chunks[1:]):
        assert before.char_start < after.char_start < before.char_end  # overlapping, in order
        assert text[before.char_end : before.char_end + 1] in (" ", "")  # ends at a word
        assert after.char_start == 0 or text[after.char_start - 1] == " "  # starts at a word
    ends_of_sentences = sum(c.text.endswith(".") for c in chunks[:-1])
    assert ends_of_sentences > 0.8 * (len(chunks) - 1)


def test_a_huge_heading_line_is_a_short_heading(tokenizer: Tokenizer) -> None:
    text = "# " + "word " * 20_000 + "\n\nBody.\n"
    chunks = chunk_document(
        document(text), TokenCounter(tokenizer), max_tokens=MAX_TOKENS, overlap_tokens=32
    )
    assert all(len(c.heading) <= MAX_TITLE_CHARS + 1 for c in chunks)  # cut, with an ellipsis
    assert chunks[0].heading.startswith("word word") and chunks[0].heading.endswith("word…")
    assert "Body." in chunks[-1].text


def test_markdown_is_embedded_without_link_targets_and_markup(tokenizer: Tokenizer) -> None:
    text = (
        "# Notes { #notes }\n\n"
        "* PR [#14233](https://github.com/fastapi/fastapi/pull/14233) by "
        '[@tiangolo](https://github.com/tiangolo). See <a href="https://x.org/a" '
        'class="external-link">the guide</a>, ![a diagram](img/flow.png "Flow") and '
        "<https://fastapi.tiangolo.com>.\n\n"
        "```python\nresult = handlers[0](event)\n```\n"
    )
    [chunk] = chunk_document(
        document(text), TokenCounter(tokenizer), max_tokens=MAX_TOKENS, overlap_tokens=0
    )
    assert chunk.text == text.strip()  # stored, cited and keyword-indexed as written
    embedded = chunk.embedding_text
    assert "PR #14233 by @tiangolo. See the guide, a diagram and ." in embedded
    assert "http" not in embedded and "{ #notes }" not in embedded and "img/" not in embedded
    assert "handlers[0](event)" in embedded  # code that only looks like a link stays
    assert chunk.n_tokens == len(tokenizer.encode(embedded, add_special_tokens=False).ids)


def test_plain_text_and_markup_free_markdown_are_embedded_as_written(tokenizer: Tokenizer) -> None:
    counter = TokenCounter(tokenizer)
    url = "Docs at https://example.com/a and [x](y.md)"
    [plain] = chunk_document(
        document(url, fmt="txt"), counter, max_tokens=MAX_TOKENS, overlap_tokens=0
    )
    assert plain.embedding_text.endswith(url)
    [md] = chunk_document(document("Just words."), counter, max_tokens=MAX_TOKENS, overlap_tokens=0)
    assert md.view == "" and md.embedding_text.endswith("Just words.")
    [image] = chunk_document(
        document("![](only.png)"), counter, max_tokens=MAX_TOKENS, overlap_tokens=0
    )
    assert image.embedding_text.endswith("![](only.png)")  # nothing left: embedded as written
