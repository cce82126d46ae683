"""Turn files into text: a registry of loaders keyed by file extension, and a safe folder walk.

Users add formats with ``register_loader(".ext", fn)`` where ``fn(path, raw_bytes)`` returns
``(text, title, has_lines)``.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .chunking import heading_of, heading_title
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


_MD_TITLE = re.compile(r"^#[ \t]+\S", re.MULTILINE)
FRONT_MATTER_CHARS = 1 << 16


def front_matter_title(text: str) -> str | None:
    """The ``title:`` of a YAML front matter block (``---`` lines around it), if any."""
    if not text.startswith("---"):
        return None
    lines = text[:FRONT_MATTER_CHARS].split("\n")
    if lines[0].strip() != "---":
        return None
    for number, line in enumerate(lines[1:], 1):
        if line.startswith("---"):
            return None
        if line.startswith("title:"):
            value = line[len("title:") :].strip()
            value = value[1:] if value.startswith(("'", '"')) else value
            value = value[:-1] if value.endswith(("'", '"')) else value
            closed = any(rest.startswith("---") for rest in lines[number + 1 :])
            return heading_title(value) if value.strip() and closed else None
    return None


def markdown_title(text: str) -> str | None:
    """The front matter title, else the first level-1 heading."""
    title = front_matter_title(text)
    match = None if title else _MD_TITLE.search(text)
    if match:
        end = text.find("\n", match.start())
        heading = heading_of(text[match.start() : end if end >= 0 else len(text)])
        title = heading[1] if heading else None
    return title


def load_markdown(path: Path, raw: bytes) -> tuple[str, str, bool]:
    text, _ = decode_text(raw)
    return text, markdown_title(text) or path.stem, True


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


class NotIndexable(ValueError):
    """A path that must not be read: a link out of the folder, not a regular file, too big."""


def outside_reason(real: str | Path, root: Path) -> str | None:
    """Why the resolved path ``real`` may not be read for ``root`` (resolved), else None."""
    if Path(real).is_relative_to(root):
        return None
    return f"a symlink to {real}, outside the folder being indexed"


def special_file_kind(mode: int) -> str | None:
    """What a file of this ``st_mode`` is when it is not a regular file ("a named pipe"...)."""
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISFIFO: "a named pipe",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISDIR: "a folder",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


def read_regular_file(path: Path, root: Path | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``; NotIndexable when it resolves outside ``root``, is not a regular
    file (a named pipe would block the read forever), or holds more than ``max_bytes``.

    The checks run before the file is opened; it is then opened without blocking and checked
    again, so a path swapped in between cannot hang or escape either. Raises OSError too.
    """
    real = os.path.realpath(path)
    reason = outside_reason(real, root) if root is not None else None
    if reason is None:
        reason = special_file_kind(os.stat(real).st_mode)
    if reason is None:
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        with open(os.open(real, flags | getattr(os, "O_CLOEXEC", 0)), "rb") as handle:
            info = os.fstat(handle.fileno())
            reason = special_file_kind(info.st_mode)
            if reason is None and (max_bytes is None or info.st_size <= max_bytes):
                data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
                if max_bytes is None or len(data) <= max_bytes:
                    return data
    if reason is None:
        raise NotIndexable(
            f"over AGENTKIT_MAX_FILE_BYTES ({max_bytes:,} bytes); raise that setting to index it"
        )
    if reason.startswith("a symlink"):
        raise NotIndexable(reason)
    raise NotIndexable(f"{reason}, not a regular file")


def walk_files(
    root: Path, warnings: list[str], on_skip: Callable[[Path, str], None] | None = None
) -> Iterator[Path]:
    """Every file under ``root`` (resolved) in a stable order; follows symlinks, but never
    loops and never enters a folder outside ``root``: that is ``on_skip(path, reason)``
    (default: a warning). Files themselves are checked when read (``read_regular_file``)."""
    seen_dirs: set[tuple[int, int]] = set()

    def on_error(error: OSError) -> None:
        warnings.append(f"cannot read {error.filename}: {error.strerror}")

    def skip(path: Path, reason: str) -> None:
        if on_skip is None:
            warnings.append(f"skipped {path}: {reason}")
        else:
            on_skip(path, reason)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        try:
            info = os.stat(dirpath)
        except OSError as error:
            on_error(error)
            dirnames[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen_dirs:
            warnings.append(f"symlink loop skipped: {dirpath}")
            dirnames[:] = []
            continue
        seen_dirs.add((info.st_dev, info.st_ino))
        inside = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            path = Path(dirpath) / name
            reason = outside_reason(os.path.realpath(path), root) if path.is_symlink() else None
            if reason is None:
                inside.append(name)
            else:
                skip(path, reason)
        dirnames[:] = inside
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def format_has_bytes_as_text(path: Path) -> bool:
    return path.suffix.lower() not in (".pdf", ".html", ".htm")


def load_file(
    path: Path, root: Path, raw: bytes | None = None, content_hash: str | None = None
) -> LoadedDocument | None:
    """The document in ``path``, or None when no loader handles it or it is binary.

    Raises OSError when the file cannot be read, NotIndexable (a ValueError) when it must not be
    (see ``read_regular_file``); loader failures become a ValueError.
    """
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        return None
    raw = read_regular_file(path, Path(root).resolve()) if raw is None else raw
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
