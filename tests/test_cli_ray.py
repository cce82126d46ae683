"""`agentkit index DIR --ray [ADDRESS]`: what reaches index_folder (no Ray needed here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agentkit import cli, retrievers
from agentkit.retrievers.types import SyncSummary


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [([], None), (["--ray"], "local"), (["10.0.0.5:6379", "--ray"], "10.0.0.5:6379"),
     (["--ray", "10.0.0.5:6379"], "10.0.0.5:6379")],
)  # fmt: skip
def test_the_ray_option_and_its_address(
    arguments: list[str], expected: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def index_folder(folder: Path, index: Any, **options: Any) -> SyncSummary:
        seen.update(options)
        return SyncSummary(index=str(tmp_path / "index"))

    monkeypatch.setattr(retrievers, "index_folder", index_folder)
    result = CliRunner().invoke(cli.app, ["index", str(tmp_path), *arguments, "--json"])
    assert result.exit_code == 0, result.output
    assert seen["ray"] == expected


def test_an_address_without_ray_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["index", str(tmp_path), "10.0.0.5:6379"])
    assert result.exit_code == 2 and "goes with --ray" in result.output
