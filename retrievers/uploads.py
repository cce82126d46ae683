"""The upload folder: file names checked, bytes never written through a link, owners kept.

Uploaded files are untrusted names and bytes from the network. A name must be one plain file
name (``check_file_name``); a file is written to a new temporary file (``O_EXCL``,
``O_NOFOLLOW``) and renamed into place, so a link planted in the folder is never followed; which
API key uploaded each file is kept beside them in ``.owners.json``.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import unicodedata
import uuid
from pathlib import Path

from agentkit.errors import ConfigError, InvalidPathError

BIDI_CONTROLS = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))} | {
    "\u200e",
    "\u200f",
    "\u061c",
}


def check_file_name(name: str | None) -> str:
    """``name`` when it is safe to store as one file of the upload folder; else an
    ``InvalidPathError`` (a 400 in the API) that says what is wrong with it."""

    def refuse(problem: str) -> InvalidPathError:
        return InvalidPathError(f"bad file name {shown!r}: {problem}; rename the file")

    shown = (name or "")[:80] + ("…" if len(name or "") > 80 else "")
    if not name or not name.strip():
        raise refuse("it is empty")
    if "\x00" in name:
        raise refuse("it contains a NUL byte")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise refuse("it is longer than 255 bytes")
    if "/" in name or "\\" in name:
        raise refuse("it contains a path separator ('/' or '\\'); send the name only")
    if any(c in BIDI_CONTROLS for c in name):
        raise refuse("it contains a bidirectional-text control character")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise refuse("it contains a control character")
    if name.startswith("."):
        raise refuse("it starts with '.' (hidden files and '..' are not accepted)")
    if name != name.strip():
        raise refuse("it starts or ends with white space")
    return name


def check_upload_name(name: str) -> bool:
    """Whether ``name`` could be the name of an uploaded file."""
    try:
        check_file_name(name)
    except InvalidPathError:
        return False
    return True


def existing_upload(folder: Path | int, name: str) -> bool:
    """Whether ``name`` exists in the upload folder (a path, or an open folder's descriptor);
    ``InvalidPathError`` when it is a link or anything but a regular file, which uploads never
    replace."""
    try:
        if isinstance(folder, int):
            found = os.stat(name, dir_fd=folder, follow_symlinks=False)
        else:
            found = os.lstat(folder / name)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(found.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(found.st_mode) else "not a regular file"
        raise InvalidPathError(
            f"{name} in the upload folder is {kind}; upload under another name "
            "or ask the server's operator to remove it"
        )
    return True


def write_upload(folder: Path, name: str, raw: bytes) -> None:
    """Store ``raw`` as ``folder/name`` without ever writing through a link: the bytes go to a
    new temporary file (O_EXCL, O_NOFOLLOW) that is renamed over ``name``; a ``name`` that is a
    link or not a regular file is refused (``InvalidPathError``)."""
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        existing_upload(directory, name)
        temp = f".upload-{uuid.uuid4().hex}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(temp, flags | getattr(os, "O_CLOEXEC", 0), 0o644, dir_fd=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(raw)
            os.replace(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=directory)
            except FileNotFoundError:
                pass
            raise
    finally:
        os.close(directory)


class UploadOwners:
    """Which key uploaded each file of the upload folder, kept beside the files in
    ``.owners.json`` (a name uploads can never have). Files without an entry belong to admins."""

    FILE = ".owners.json"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        try:
            self._owners: dict[str, str] = json.loads((folder / self.FILE).read_text("utf-8"))
        except FileNotFoundError:
            self._owners = {}
        except (ValueError, OSError) as error:
            raise ConfigError(
                f"{folder / self.FILE} cannot be read ({error}); restore it, or delete it to make "
                "every upload so far an admin's"
            ) from None

    def owner_of(self, name: str) -> str | None:
        return self._owners.get(name)

    def set(self, name: str, owner: str | None) -> None:
        with self._lock:
            if owner is None:
                self._owners.pop(name, None)
            else:
                self._owners[name] = owner
            write_upload(self.folder, self.FILE, json.dumps(self._owners).encode())
