"""A folder a request names is indexed only inside the server's document roots."""

from pathlib import Path

import pytest

from agentkit.errors import InvalidPathError, OutsideRootsError
from agentkit.retrievers.roots import folder_in_roots


def test_a_folder_inside_a_root_is_resolved(tmp_path: Path) -> None:
    (tmp_path / "docs" / "guide").mkdir(parents=True)
    roots = [(tmp_path / "docs").resolve()]
    assert folder_in_roots(str(tmp_path / "docs" / "guide"), roots) == roots[0] / "guide"
    assert folder_in_roots(str(tmp_path / "docs"), roots) == roots[0]


def test_dot_dot_and_links_that_leave_the_root_are_refused(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "docs" / "way-out").symlink_to(tmp_path / "secret")
    roots = [(tmp_path / "docs").resolve()]
    for hostile in (f"{tmp_path}/docs/../secret", f"{tmp_path}/docs/way-out", "/etc", "/"):
        with pytest.raises(OutsideRootsError, match="AGENTKIT_API_DOCUMENT_ROOTS"):
            folder_in_roots(hostile, roots)


def test_a_name_that_only_starts_like_a_root_is_outside_it(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs-private").mkdir()
    with pytest.raises(OutsideRootsError):
        folder_in_roots(str(tmp_path / "docs-private"), [(tmp_path / "docs").resolve()])


def test_a_file_or_a_nul_byte_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n")
    roots = [(tmp_path / "docs").resolve()]
    with pytest.raises(InvalidPathError, match="not a folder"):
        folder_in_roots(str(tmp_path / "docs" / "a.md"), roots)
    with pytest.raises(InvalidPathError, match="NUL"):
        folder_in_roots(f"{tmp_path}/docs\x00/x", roots)


def test_no_roots_means_no_folder(tmp_path: Path) -> None:
    with pytest.raises(OutsideRootsError):
        folder_in_roots(str(tmp_path), [])
