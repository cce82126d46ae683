"""Writing small CSV files for tests (XSTest prompts, labelled completions)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """``rows`` as a CSV file with a header of the first row's keys; returns ``path``."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
