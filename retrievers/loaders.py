"""Turn files into text: a registry of loaders keyed by file extension, and a safe folder walk.

Users add formats with ``register_loader(".ext", fn)`` where ``fn(path, raw_bytes)`` returns
``(text, title, has_lines)``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from .chunking import heading_title
from .types import LoadedDocument

LoaderFn = Callable[[Path, bytes], tuple[str, str, bool]]
_LOADERS: dict[str, LoaderFn] = {}


def register_loader(extension: str, loader: LoaderFn) -> None:
    """Use ``loader`` for files ending in ``extension`` (e.g. ``".adoc"``); replaces any other."""
    _LOADERS[extension.lower() if extension.startswith(".") else "." + extension.lower()] = loader


def supported_extensions() -> list[str]:
    return sorted(_LOADERS)


def decode_text(raw: bytes) -> tuple[str, int]:
    """UTF-8 (with BOM) text and how many undecodable byte sequences were replaced."""
    try:
        return raw.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
        genuine = raw.decode("utf-8-sig", errors="ignore").count("\ufffd")
        return text, text.count("\ufffd") - genuine


def looks_binary(raw: bytes) -> bool:
    return b"\x00" in raw[:8192]


_MD_TITLE = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)
_FRONT_MATTER_TITLE = re.compile(
    r"\A---\s*\n(?:.*\n)*?title:\s*[\"']?(.+?)[\"']?\s*\n(?:.*\n)*?---", re.MULTILINE
)


def load_markdown(path: Path, raw: bytes) -> tuple[str, str, bool]:
    text, _ = decode_text(raw)
    match = _FRONT_MATTER_TITLE.match(text) or _MD_TITLE.search(text)
    return text, heading_title(match.group(1)) if match else path.stem, True


def load_plain_text(path: Path, raw: bytes) -> tuple[str, str, bool]:
    text, _ = decode_text(raw)
    return text, path.stem, True


def load_rst(path: Path, raw: bytes) -> tuple[str, str, bool]:
    text, _ = decode_text(raw)
    match = re.search(r"^(?!\s)(.+)\n([=\-~^#*+])\2{2,}\s*$", text, re.MULTILINE)
    return text, match.group(1).strip() if match else path.stem, True


def load_html(path: Path, raw: bytes) -> tuple[str, str, bool]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(raw, "html.parser")
    for element in soup(["script", "style", "noscript"]):
        element.decompose()
    heading = soup.find("h1")
    title = soup.title.string if soup.title and soup.title.string else None
    title = title or (heading.get_text(" ", strip=True) if heading else path.stem)
    text = re.sub(r"\n{3,}", "\n\n", soup.get_text("\n"))
    return text.strip(), title.strip(), False


def load_pdf(path: Path, raw: bytes) -> tuple[str, str, bool]:
    """Pages are separated by form feeds (``\\f``), so a character offset maps to a page."""
    import io

    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(raw))
    pages = [(page.extract_text() or "").replace("\f", " ") for page in reader.pages]
    title = (reader.metadata.title if reader.metadata else None) or path.stem
    return "\f".join(pages), str(title), False


for _ext in (".md", ".markdown"):
    register_loader(_ext, load_markdown)
register_loader(".txt", load_plain_text)
register_loader(".rst", load_rst)
for _ext in (".html", ".htm"):
    register_loader(_ext, load_html)
register_loader(".pdf", load_pdf)


def walk_files(root: Path, warnings: list[str]) -> Iterator[Path]:
    """Every regular file under ``root`` in a stable order; follows symlinks but never loops."""
    seen_dirs: set[tuple[int, int]] = set()

    def on_error(error: OSError) -> None:
        warnings.append(f"cannot read {error.filename}: {error.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        try:
            stat = os.stat(dirpath)
        except OSError as error:
            on_error(error)
            dirnames[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            warnings.append(f"symlink loop skipped: {dirpath}")
            dirnames[:] = []
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def format_has_bytes_as_text(path: Path) -> bool:
    return path.suffix.lower() not in (".pdf", ".html", ".htm")


def load_file(
    path: Path, root: Path, raw: bytes | None = None, content_hash: str | None = None
) -> LoadedDocument | None:
    """The document in ``path``, or None when no loader handles it or it is binary.

    Raises OSError when the file cannot be read; loader failures become a ValueError.
    """
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        return None
    raw = path.read_bytes() if raw is None else raw
    if path.suffix.lower() != ".pdf" and looks_binary(raw):
        return None
    source = path.relative_to(root).as_posix()
    try:
        text, title, has_lines = loader(path, raw)
    except Exception as error:  # a broken PDF or HTML file must not stop a run
        raise ValueError(f"{source}: {type(error).__name__}: {error}") from error
    warnings = []
    replaced = decode_text(raw)[1] if format_has_bytes_as_text(path) else 0
    if replaced:
        warnings.append(f"{source}: {replaced} undecodable byte sequence(s) replaced with U+FFFD")
    return LoadedDocument(
        source=source,
        text=text,
        title=title,
        format=path.suffix.lower().lstrip("."),
        content_hash=content_hash or hashlib.sha256(raw).hexdigest(),
        root=str(root),
        has_lines=has_lines,
        warnings=warnings,
    )
