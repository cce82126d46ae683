"""Folders a server may index: a requested folder must lie inside one of its document roots.

The folder name comes from a request, so it is untrusted: links are resolved first (where a
folder really is counts, not what its name says), and a NUL byte or a file is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from agentkit.errors import InvalidPathError, OutsideRootsError


def folder_in_roots(folder: str, roots: Iterable[Path]) -> Path:
    """The resolved ``folder`` when it is one of ``roots`` (resolved already) or inside one;
    ``OutsideRootsError`` when it is not, ``InvalidPathError`` when it is not a folder."""
    if "\x00" in folder:
        raise InvalidPathError("the folder name contains a NUL byte")
    path = Path(folder).resolve()  # links followed: where it really is counts
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise OutsideRootsError(
            "that folder is outside the configured document roots "
            "(AGENTKIT_API_DOCUMENT_ROOTS); give a folder inside one"
        )
    if not path.is_dir():
        raise InvalidPathError(f"{folder} is not a folder")
    return path
