"""Loaders pick titles and text; odd files are skipped or reported, never fatal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentkit.retrievers.chunking import MAX_TITLE_CHARS
from agentkit.retrievers.loaders import (
    NotIndexable,
    load_file,
    read_regular_file,
    register_loader,
    walk_files,
)


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text``, with a correct cross-reference table."""
    stream = f"BT /F1 18 Tf 20 60 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 144] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer << /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def test_titles_come_from_the_document(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("intro\n# The Title\n\ntext")
    (tmp_path / "b.rst").write_text("Section Name\n============\n\nbody")
    (tmp_path / "c.txt").write_text("plain")
    (tmp_path / "d.md").write_text("# Body - Fields { #body-fields }\n\ntext")
    titles = {p.name: load_file(p, tmp_path).title for p in sorted(tmp_path.iterdir())}
    assert titles == {
        "a.md": "The Title",
        "b.rst": "Section Name",
        "c.txt": "c",
        "d.md": "Body - Fields",  # the attribute list is markup, not title
    }


@pytest.mark.parametrize(
    "text, title",
    [
        ("---\ntitle: 'Front Title'\nauthor: me\n---\n# Heading\n", "Front Title"),
        ("---\n\ntitle: Plain\n---\n", "Plain"),
        ("---\ntitle: Unclosed\n# Heading ##\n", "Heading"),  # no closing ---: not front matter
        ("## Second\n#\tTabbed #\n", "Tabbed"),
        ("#  \n# Real\n", "Real"),  # an empty heading is no title
        ("# Title" + " " * 50_000 + "x\n", "Title…"),  # cut at MAX_TITLE_CHARS
        ("# " + "word " * 20_000, ("word " * (MAX_TITLE_CHARS // 5)).rstrip() + "…"),
    ],
    ids=["front-matter", "blank-line", "unclosed", "tab", "empty", "spaces", "huge"],
)
def test_markdown_titles_take_linear_time_and_stay_short(
    tmp_path: Path, text: str, title: str
) -> None:
    (tmp_path / "doc.md").write_text(text)
    assert load_file(tmp_path / "doc.md", tmp_path).title == title


def test_html_drops_scripts_and_keeps_text(docs: Path) -> None:
    doc = load_file(docs / "page.html", docs)
    assert doc.title == "Web page"
    assert "pelican" in doc.text and "secret" not in doc.text
    assert doc.has_lines is False


def test_pdf_text_is_extracted(tmp_path: Path) -> None:
    (tmp_path / "x.pdf").write_bytes(minimal_pdf("The heron lives here."))
    doc = load_file(tmp_path / "x.pdf", tmp_path)
    assert "heron" in doc.text


def test_binary_and_unknown_files_are_not_loaded(docs: Path, tmp_path: Path) -> None:
    assert load_file(docs / "image.png", docs) is None
    (tmp_path / "fake.txt").write_bytes(b"abc\x00\x01\x02")
    assert load_file(tmp_path / "fake.txt", tmp_path) is None


def test_undecodable_bytes_are_replaced_and_reported(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    doc = load_file(tmp_path / "latin.txt", tmp_path)
    assert doc.text == "caf\ufffd cr\ufffdme"
    assert doc.warnings == ["latin.txt: 2 undecodable byte sequence(s) replaced with U+FFFD"]


def test_walk_survives_symlink_loops_and_dangling_links(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("# A")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")
    os.symlink(tmp_path / "missing.md", tmp_path / "dangling.md")
    warnings: list[str] = []
    files = [p.relative_to(tmp_path).as_posix() for p in walk_files(tmp_path, warnings)]
    assert files == ["dangling.md", "sub/a.md"]
    assert any("symlink loop" in w for w in warnings)


def test_walk_never_enters_a_folder_outside_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inside").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.md").write_text("# Secret")
    (root / "inside" / "a.md").write_text("# A")
    os.symlink(outside, root / "out")
    os.symlink(root / "inside", root / "also")
    warnings: list[str] = []
    files = [p.relative_to(root).as_posix() for p in walk_files(root.resolve(), warnings)]
    assert files == ["also/a.md"]  # "inside" is the same folder: walked once
    real = os.path.realpath(outside)
    assert (
        f"skipped {root.resolve()}/out: a symlink to {real}, outside the folder being indexed"
        in (warnings)
    )


def test_only_regular_files_inside_the_root_are_read(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    root = (tmp_path / "root").resolve()
    os.mkfifo(root / "pipe.md")
    (tmp_path / "secret.md").write_text("secret")
    os.symlink(tmp_path / "secret.md", root / "link.md")
    (root / "big.md").write_text("x" * 101)
    with pytest.raises(NotIndexable, match="a named pipe, not a regular file"):
        read_regular_file(root / "pipe.md", root)  # returns at once: never opened
    with pytest.raises(NotIndexable, match="outside the folder being indexed"):
        read_regular_file(root / "link.md", root)
    with pytest.raises(NotIndexable, match="over AGENTKIT_MAX_FILE_BYTES \\(100 bytes\\)"):
        read_regular_file(root / "big.md", root, max_bytes=100)
    assert read_regular_file(root / "big.md", root, max_bytes=101) == b"x" * 101
    assert read_regular_file(root / "link.md") == b"secret"  # no root: no confinement


def test_users_can_register_a_loader(tmp_path: Path) -> None:
    register_loader(".adoc", lambda path, raw: (raw.decode().upper(), "From AsciiDoc", True))
    (tmp_path / "x.adoc").write_text("= hello")
    doc = load_file(tmp_path / "x.adoc", tmp_path)
    assert (doc.text, doc.title, doc.format) == ("= HELLO", "From AsciiDoc", "adoc")
