"""The `agentkit` command line: a thin shell over the SDK (parse, call, format)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from agentkit.errors import AgentkitError
from agentkit.settings import get_settings

app = typer.Typer(
    help="agentkit: RAG, PAL and ReAct agents on a self-hosted model.", no_args_is_help=True
)
console = Console()
errors = Console(stderr=True)

IndexOption = Annotated[
    Path | None,
    typer.Option("--index", help="Index folder (default: AGENTKIT_INDEX or ./.agentkit/index)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Quiet, machine-readable output.")]


@contextmanager
def reported_errors() -> Iterator[None]:
    """Our errors become one line on stderr and exit status 1, never a traceback."""
    try:
        yield
    except AgentkitError as error:
        errors.print(f"[bold red]error:[/] {error}", highlight=False)
        raise typer.Exit(1) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


@contextmanager
def index_progress(enabled: bool) -> Iterator[Callable[[int, int, int], None] | None]:
    """A rich progress bar (files, chunks, chunks/s, ETA), or nothing when not on a terminal."""
    if not enabled:
        yield None
        return
    started = time.perf_counter()
    columns = (
        TextColumn("[bold]indexing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("files · {task.fields[chunks]} chunks · {task.fields[rate]} chunks/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=errors, transient=True) as progress:
        task = progress.add_task("index", total=None, chunks=0, rate="0.0")

        def update(done: int, total: int, chunks: int) -> None:
            rate = chunks / max(time.perf_counter() - started, 1e-9)
            progress.update(task, completed=done, total=total, chunks=chunks, rate=f"{rate:.1f}")

        yield update


@app.command("index")
def index_command(
    folder: Annotated[Path, typer.Argument(help="Folder of documents (.md .txt .rst .html .pdf).")],
    index: IndexOption = None,
    full: Annotated[bool, typer.Option("--full", help="Rebuild from scratch.")] = False,
    embedding_model: Annotated[
        str | None, typer.Option(help="sentence-transformers model name or path (new indexes).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Index a folder: new files are added, changed ones replaced, deleted ones removed."""
    from agentkit.retrievers import index_folder

    with reported_errors():
        settings = get_settings(embedding_model=embedding_model)
        with index_progress(not as_json and errors.is_terminal) as progress:
            summary = index_folder(folder, index, full=full, settings=settings, progress=progress)
    if as_json:
        print_json(summary.to_dict())
        return
    console.print(
        f"[bold]{summary.index}[/]: {summary.added} added, {summary.updated} updated, "
        f"{summary.removed} removed, {summary.unchanged} unchanged, {summary.skipped} skipped · "
        f"{summary.chunks_embedded} chunks embedded in {summary.seconds:.1f}s "
        f"({summary.chunks_per_second:.1f}/s) · {summary.documents_total} documents, "
        f"{summary.chunks_total} chunks in the index",
        highlight=False,
    )
    for warning in summary.warnings:
        errors.print(f"[yellow]warning:[/] {warning}", highlight=False)


@app.command("search")
def search_command(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="How many hits.")] = 5,
    mode: Annotated[str, typer.Option(help="hybrid, dense or bm25.")] = "hybrid",
    index: IndexOption = None,
    as_json: JsonOption = False,
) -> None:
    """Search the index; each hit shows where to cite it (path:line)."""
    from agentkit.retrievers import Index

    with reported_errors():
        with Index.open(index) as opened:
            hits = opened.search(query, k=k, mode=mode)  # type: ignore[arg-type]
    if as_json:
        print_json([hit.to_dict() for hit in hits])
        return
    if not hits:
        console.print("no hits")
    for rank, hit in enumerate(hits, 1):
        where = f" · {hit.heading}" if hit.heading else ""
        location = hit.location
        if location.startswith(str(Path.cwd()) + "/"):
            location = location[len(str(Path.cwd())) + 1 :]
        console.print(
            f"[bold]{rank}. {location}[/]{where}  [dim]{hit.score:.4f}[/]", highlight=False
        )
        snippet = " ".join(hit.text.split())
        console.print(f"   {snippet[:240]}{'…' if len(snippet) > 240 else ''}", highlight=False)


@app.command("stats")
def stats_command(index: IndexOption = None) -> None:
    """Print what an index holds and how it was built (its manifest) as JSON."""
    from agentkit.retrievers import Index

    with reported_errors(), Index.open(index) as opened:
        print_json(opened.stats())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
