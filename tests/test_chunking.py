"""Chunks fit the embedding model: sized in its tokens, never silently truncated."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from agentkit.retrievers.chunking import (
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
