"""The `agentkit` command line: a thin shell over the SDK (parse, call, format)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from agentkit.errors import AgentkitError
from agentkit.settings import GuardKind, get_settings

app = typer.Typer(
    help="agentkit: RAG, PAL and ReAct agents on a self-hosted model.", no_args_is_help=True
)
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)

IndexOption = Annotated[
    Path | None,
    typer.Option("--index", help="Index folder (default: AGENTKIT_INDEX or ./.agentkit/index)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Quiet, machine-readable output.")]


def require_choices(**options: tuple[str, tuple[str, ...]]) -> None:
    """Exit 2 (a usage error) naming the first ``--option`` whose value is not one allowed."""
    for name, (value, allowed) in options.items():
        if value not in allowed:
            errors.print(f"[bold red]error:[/] --{name} must be one of {', '.join(allowed)}")
            raise typer.Exit(2)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Our errors become one line on stderr and exit status 1, never a traceback."""
    try:
        yield
    except AgentkitError as error:
        errors.print(f"[bold red]error:[/] {error}", highlight=False)
        raise typer.Exit(1) from None


def print_json(data: Any, indent: int | None = 2) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=indent) + "\n")


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
    address: Annotated[
        str | None,
        typer.Argument(help="With --ray: the Ray cluster's address (host:port); none: local."),
    ] = None,
    index: IndexOption = None,
    full: Annotated[bool, typer.Option("--full", help="Rebuild from scratch.")] = False,
    embedding_model: Annotated[
        str | None, typer.Option(help="sentence-transformers model name or path (new indexes).")
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray", help="Read, chunk and embed on a Ray cluster (the ray extra); one writer."
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Index a folder: new files are added, changed ones replaced, deleted ones removed.

    `agentkit index DIR --ray [ADDRESS]` spreads the work over a Ray cluster (a local one
    without ADDRESS); the folder must be at the same path on every node."""
    from agentkit.retrievers import index_folder

    if address is not None and not ray:
        errors.print(f"[bold red]error:[/] {address!r}: a cluster address goes with --ray")
        raise typer.Exit(2)
    with reported_errors():
        settings = get_settings(embedding_model=embedding_model)
        with index_progress(not as_json and errors.is_terminal) as progress:
            summary = index_folder(
                folder,
                index,
                full=full,
                settings=settings,
                progress=progress,
                ray=(address or "local") if ray else None,
            )
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
        location = relative(hit.location)
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


def relative(location: str) -> str:
    cwd = str(Path.cwd()) + "/"
    return location[len(cwd) :] if location.startswith(cwd) else location


LlmUrlOption = Annotated[
    str | None,
    typer.Option("--llm-url", help="Model server URL(s), comma-separated (AGENTKIT_LLM_URL)."),
]
BestOfOption = Annotated[
    int, typer.Option("--best-of", min=1, max=16, help="Sample N answers, return the best.")
]
GuardOption = Annotated[
    str | None,
    typer.Option("--guard", help="Moderate none, input, output or both (AGENTKIT_GUARD)."),
]
ReviseOption = Annotated[
    bool | None,
    typer.Option("--revise/--no-revise", help="Critique and revise by the constitution."),
]


def guarded_context(settings: Any, model: Any, best_of: int, **context: Any) -> Any:
    """The agents' context with the guardrails the settings and ``best_of`` ask for, or None
    when they ask for none (the commands then run as they always did)."""
    from agentkit.agents import AgentContext
    from agentkit.guardrails import Guardrails

    rails = Guardrails.from_settings(settings, model, best_of=best_of)
    return None if rails is None else AgentContext(model, settings, guardrails=rails, **context)


def print_guarded(result: Any, as_json: bool) -> None:
    """A guarded run's answer, and what the guardrails did (on stderr)."""
    if as_json:
        print_json({"text": result.text, "agentkit": result.data})
        return
    console.print(result.text, highlight=False, markup=False)
    for citation in result.data.get("citations", []):
        console.print(f"  [{citation['number']}] {relative(citation['location'])}",
                      highlight=False, markup=False)  # fmt: skip
    rails = result.data.get("guardrails", {})
    if rails.get("action", "passed") != "passed":
        errors.print(f"[yellow]guardrails:[/] {rails['action']}", highlight=False)
    if rails.get("critique"):
        errors.print(f"[dim]critique:[/] {rails['critique']}", highlight=False, markup=False)
    if rails.get("best_of"):
        best = rails["best_of"]
        errors.print(f"[dim]best of {best['n']} by {best['reward']}: scores {best['scores']}[/]",
                     highlight=False)  # fmt: skip


@app.command("ask")
def ask_command(
    question: Annotated[str, typer.Argument(help="The question.")],
    index: IndexOption = None,
    llm_url: LlmUrlOption = None,
    k: Annotated[int | None, typer.Option("-k", "--k", min=1, max=50, help="Sources.")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print the answer as it comes.")] = False,
    best_of: BestOfOption = 1,
    guard: GuardOption = None,
    revise: ReviseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Answer a question from the indexed documents, citing them as [n] path:line."""
    from agentkit.agents import AgentRequest, run_agent
    from agentkit.llm import connect
    from agentkit.rag import RAG, Answer
    from agentkit.retrievers import Index

    with reported_errors():
        settings = get_settings(llm_url=llm_url, rag_k=k, guard=guard, revise=revise)
        with Index.open(index, settings=settings) as opened, connect(settings) as model:
            guarded = guarded_context(settings, model, best_of, index=opened)
            if guarded is not None:  # guardrails: the answer is shown after the checks
                result = run_agent("agentkit-rag", guarded, AgentRequest.ask(question))
                print_guarded(result, as_json)
                return
            rag = RAG.from_settings(opened, model, settings)
            if stream and not as_json:
                answer = None
                for item in rag.stream(question):
                    if isinstance(item, Answer):
                        answer = item
                    else:
                        sys.stdout.write(item)
                        sys.stdout.flush()
                sys.stdout.write("\n")
                assert answer is not None
            else:
                answer = rag.ask(question)
    if as_json:
        print_json(answer.to_dict())
        return
    if not stream:
        console.print(answer.text, highlight=False, markup=False)
    if answer.citations:
        console.print("\n[bold]Sources[/]")
        for citation in answer.citations:
            console.print(
                f"  [{citation.number}] {relative(citation.hit.location)}",
                highlight=False,
                markup=False,
            )
    for number in answer.invalid_citations:
        errors.print(
            f"[yellow]warning:[/] removed citation [{number}]: no such source", highlight=False
        )
    if answer.dropped_sources:
        errors.print(
            f"[yellow]warning:[/] {len(answer.dropped_sources)} sources did not fit the "
            "model's context and were left out",
            highlight=False,
        )


model_app = typer.Typer(help="Prepare and serve the model (vLLM).", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("prepare")
def model_prepare_command(
    name: Annotated[str | None, typer.Argument(help="Embedded model (default: CPU one).")] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: also build the W8A8 checkpoint. Default: AGENTKIT_MODEL_PRECISION."
        ),
    ] = None,
) -> None:
    """Assemble, verify (sha256) and convert the embedded model for vLLM; cached, idempotent."""
    from agentkit.services.model_prepare import prepare_model

    if quantize not in (None, "int8", "float32"):
        errors.print(f"[bold red]error:[/] --quantize must be int8 (or float32), not {quantize!r}")
        raise typer.Exit(2)
    with reported_errors():
        settings = get_settings()
        folder = prepare_model(
            settings.cache_dir,
            name,
            report=lambda m: errors.print(m, highlight=False),
            quantize=quantize or settings.model_precision,
        )
    console.print(str(folder), highlight=False)


@model_app.command("serve")
def model_serve_command(
    model: Annotated[str | None, typer.Option(help="HF name or folder; default: embedded.")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Default: AGENTKIT_MODEL_PORT or 8000.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    tensor_parallel_size: Annotated[int, typer.Option(min=1)] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option(min=1)] = 1,
    data_parallel_size: Annotated[
        int, typer.Option(min=1, help="Copies of the model, each on tensor×pipeline GPUs.")
    ] = 1,
    lora: Annotated[
        list[str] | None,
        typer.Option(help="A LoRA adapter NAME=PATH (repeatable); requests name it as the model."),
    ] = None,
    max_lora_rank: Annotated[int | None, typer.Option(min=1)] = None,
    max_model_len: Annotated[int | None, typer.Option(min=256)] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(min=0.05, max=1.0)] = None,
    quantization: Annotated[str | None, typer.Option(help="e.g. awq, gptq, fp8.")] = None,
    tool_call_parser: Annotated[
        str | None, typer.Option(help="vLLM tool-call parser (embedded model: hermes).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Default: float32 on CPU, auto on GPU.")] = None,
    max_restarts: Annotated[int, typer.Option(min=0)] = 3,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Embedded model: float32 or int8 (W8A8). Default: AGENTKIT_MODEL_PRECISION."
        ),
    ] = None,
    force_int8: Annotated[
        bool, typer.Option(help="Serve int8 even on a CPU where it is slower than float32.")
    ] = False,
) -> None:
    """Start vLLM's OpenAI-compatible server, wait until healthy, supervise it until Ctrl-C."""
    import signal as signals

    from agentkit.services.model_server import ModelServer, ServeOptions, parse_lora

    if device not in ("auto", "cpu", "cuda"):
        errors.print(f"[bold red]error:[/] --device must be auto, cpu or cuda, not {device!r}")
        raise typer.Exit(2)
    if precision not in (None, "float32", "int8"):
        errors.print(f"[bold red]error:[/] --precision must be float32 or int8, not {precision!r}")
        raise typer.Exit(2)
    with reported_errors():
        settings = get_settings()
        options = ServeOptions(
            model=model,
            host=host,
            port=port or settings.model_port,
            device=device,  # type: ignore[arg-type]
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            data_parallel_size=data_parallel_size,
            lora=parse_lora(lora or []),
            max_lora_rank=max_lora_rank,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            quantization=quantization,
            dtype=dtype,
            max_restarts=max_restarts,
            tool_call_parser=tool_call_parser,
            # the setting is for the embedded model; a model of your own is served as it is
            precision=precision or ("float32" if model else settings.model_precision),  # type: ignore[arg-type]
            force_int8=force_int8,
        )
        server = ModelServer(options, settings.cache_dir)
        signals.signal(signals.SIGTERM, lambda *_: server.stop())
        errors.print(f"starting the model server; log: {server.log_file}", highlight=False)
        try:
            url = server.start(report=lambda m: errors.print(m, highlight=False))
            console.print(
                f"model server ready at {url} (model {server.served_name}); "
                f"use it with AGENTKIT_LLM_URL={url}",
                highlight=False,
            )
            server.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


sandbox_app = typer.Typer(help="Run Python in the sandbox PAL uses.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")


@sandbox_app.command("run")
def sandbox_run_command(
    file: Annotated[Path, typer.Argument(help="A Python file that defines the entry function.")],
    entry: Annotated[str, typer.Option(help="Function to call.")] = "solution",
    timeout: Annotated[float, typer.Option(min=0.01, help="Wall-clock seconds.")] = 5.0,
    memory: Annotated[int, typer.Option(min=16, help="Memory limit in MB.")] = 256,
    allow_import: Annotated[
        list[str] | None, typer.Option(help="Allow another module (repeatable), e.g. numpy.")
    ] = None,
) -> None:
    """Run FILE's entry function in the sandbox and print the result as JSON (exit 0 if it ran)."""
    from agentkit.errors import InvalidPathError
    from agentkit.tools.sandbox import DEFAULT_IMPORTS, Sandbox

    with reported_errors():
        if not file.is_file():
            raise InvalidPathError(f"{file} is not a file")
        code = file.read_text(encoding="utf-8", errors="replace")
        with Sandbox(allowed_imports=DEFAULT_IMPORTS | set(allow_import or ())) as sandbox:
            result = sandbox.run(code, entry=entry, timeout_s=timeout, memory_mb=memory)
    print_json(result.to_dict(), indent=None)  # a nested value indented would be ~50x its size


@app.command("pal")
def pal_command(
    question: Annotated[str, typer.Argument(help="A question a short program can answer.")],
    llm_url: LlmUrlOption = None,
    samples: Annotated[int, typer.Option(min=1, max=40, help="Self-consistency votes.")] = 1,
    explain: Annotated[bool, typer.Option(help="State the answer in words.")] = False,
    best_of: BestOfOption = 1,
    guard: GuardOption = None,
    revise: ReviseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Answer by having the model write a program and running it in the sandbox."""
    from agentkit.agents import AgentRequest, run_agent
    from agentkit.llm import connect
    from agentkit.pal import PAL

    with reported_errors():
        settings = get_settings(llm_url=llm_url, guard=guard, revise=revise)
        with connect(settings) as model:
            guarded = guarded_context(settings, model, best_of)
            if guarded is not None:  # guardrails: through the runner's agentkit-pal
                result = run_agent("agentkit-pal", guarded, AgentRequest.ask(question))
                print_guarded(result, as_json)
                return
            answer = PAL(model, samples=samples, explain=explain).solve(question)
    if as_json:
        print_json(answer.to_dict())
        return
    if answer.program:
        console.print(answer.program, highlight=False, markup=False)
    if answer.ok:
        console.print(f"\n[bold]{answer.text}[/]", highlight=False)
    else:
        errors.print(f"[bold red]no answer:[/] {answer.result.error}", highlight=False)
        raise typer.Exit(1)


eval_app = typer.Typer(help="Evaluate agents on public benchmarks.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
ConcurrencyOption = Annotated[
    int, typer.Option(min=1, max=64, help="Problems in flight at once (vLLM batches them).")
]


@eval_app.command("gsm8k")
def eval_gsm8k_command(
    data: Annotated[Path, typer.Option(help="GSM8K JSONL (question, answer with ####).")],
    limit: Annotated[int | None, typer.Option(min=1)] = None,
    start: Annotated[
        int, typer.Option(min=0, help="Skip this many rows first (e.g. a held-out range).")
    ] = 0,
    mode: Annotated[str, typer.Option(help="pal or cot.")] = "pal",
    samples: Annotated[int, typer.Option(min=1, max=40)] = 1,
    concurrency: ConcurrencyOption = 1,
    llm_url: LlmUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Accuracy against the number after ####, execution errors, timeouts, latency."""
    from agentkit.evaluation import eval_gsm8k
    from agentkit.llm import connect

    if mode not in ("pal", "cot"):
        errors.print(f"[bold red]error:[/] --mode must be pal or cot, not {mode!r}")
        raise typer.Exit(2)
    with reported_errors(), connect(get_settings(llm_url=llm_url)) as model:
        report = eval_gsm8k(
            model,
            data,
            limit=limit,
            start=start,
            mode=mode,
            samples=samples,
            concurrency=concurrency,
            progress=None
            if as_json
            else lambda i, n: errors.print(f"{i}/{n}", end="\r", highlight=False),
        )
    if as_json:
        print_json(report)
        return
    summary = {k: v for k, v in report.items() if k != "records"}
    console.print(summary, highlight=False)


@eval_app.command("hotpotqa")
def eval_hotpotqa_command(
    data: Annotated[Path, typer.Option(help="HotpotQA JSONL (question, answer, context).")],
    limit: Annotated[int | None, typer.Option(min=1)] = None,
    mode: Annotated[str, typer.Option(help="react, rag or cot.")] = "react",
    index: Annotated[
        Path | None, typer.Option(help="Where to build the paragraphs' index.")
    ] = None,
    no_structured: Annotated[bool, typer.Option(help="Parse steps without a regex.")] = False,
    max_steps: Annotated[int, typer.Option(min=1, max=50)] = 8,
    concurrency: ConcurrencyOption = 1,
    llm_url: LlmUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Exact match and F1 of ReAct, RAG or CoT; steps, parse failures, fallbacks, latency."""
    from agentkit.evaluation import eval_hotpotqa
    from agentkit.llm import connect

    if mode not in ("react", "rag", "cot"):
        errors.print(f"[bold red]error:[/] --mode must be react, rag or cot, not {mode!r}")
        raise typer.Exit(2)
    index_path = index or Path(".agentkit") / f"hotpotqa-{data.stem}"
    with reported_errors(), connect(get_settings(llm_url=llm_url)) as model:
        report = eval_hotpotqa(
            model,
            data,
            index_path,
            limit=limit,
            mode=mode,
            structured=not no_structured,
            max_steps=max_steps,
            concurrency=concurrency,
        )
    if as_json:
        print_json(report)
        return
    console.print({k: v for k, v in report.items() if k != "records"}, highlight=False)


@eval_app.command("xstest")
def eval_xstest_command(
    data: Annotated[Path, typer.Option(help="XSTest CSV (prompt, type, label safe/unsafe).")],
    guard: Annotated[str, typer.Option(help="none, input, output or both.")] = "none",
    guard_kind: Annotated[
        str | None,
        typer.Option(
            help="auto, judge, llama-guard, learned, or learned+judge / "
            "learned+llama-guard (layered) (AGENTKIT_GUARD_KIND)."
        ),
    ] = None,
    policy: Annotated[str, typer.Option(help="block, flag or revise.")] = "block",
    revise: Annotated[bool, typer.Option(help="Critique and revise every answer.")] = False,
    limit: Annotated[
        int | None, typer.Option(min=2, help="A balanced N: half safe, half unsafe.")
    ] = None,
    split: Annotated[str, typer.Option(help="all, or held_out (prompts not tuned on).")] = "all",
    agent: Annotated[
        str, typer.Option(help="agentkit-rag, -pal, -react; default: the served model.")
    ] = "",
    index: IndexOption = None,
    max_tokens: Annotated[int, typer.Option(min=8, max=4096)] = 128,
    llm_url: LlmUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Over-refusal of safe prompts and compliance with unsafe ones, with and without guards."""
    from agentkit.agents import AgentContext, agent_names
    from agentkit.guardrails import Guardrails
    from agentkit.llm import connect
    from agentkit.retrievers import Index
    from agentkit.tools.sandbox import Sandbox
    from agentkit.xstest import eval_xstest

    require_choices(guard=(guard, ("none", "input", "output", "both")),
                    policy=(policy, ("block", "flag", "revise")),
                    split=(split, ("all", "tuning", "held_out")))  # fmt: skip
    if guard_kind is not None:
        require_choices(**{"guard-kind": (guard_kind, get_args(GuardKind))})
    if agent:
        require_choices(agent=(agent, tuple(agent_names())))
    with reported_errors(), ExitStack() as stack:
        settings = get_settings(llm_url=llm_url, guard=guard, guard_kind=guard_kind,
                                guard_policy=policy, revise=revise)  # fmt: skip
        opened = None  # RAG and ReAct answer from an index (`agentkit index` builds one)
        if agent in ("agentkit-rag", "agentkit-react"):
            opened = stack.enter_context(Index.open(index, settings=settings))
        sandbox = stack.enter_context(Sandbox()) if agent == "agentkit-pal" else None
        model = stack.enter_context(connect(settings))
        rails = Guardrails.from_settings(settings, model)
        context = AgentContext(model, settings, index=opened, sandbox=sandbox, guardrails=rails)
        report = eval_xstest(
            context,
            data,
            agent=agent,
            limit=limit,
            split=split,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            progress=None
            if as_json
            else lambda i, n: errors.print(f"{i}/{n}", end="\r", highlight=False),
        )
    if as_json:
        print_json(report)
        return
    console.print({k: v for k, v in report.items() if k != "records"}, highlight=False)


@eval_app.command("refusal")
def eval_refusal_command(
    data: Annotated[Path, typer.Option(help="XSTest's labelled completions CSV.")],
    split: Annotated[str, typer.Option(help="all, tuning or held_out.")] = "held_out",
    classifier: Annotated[
        str,
        typer.Option(
            help="rules (string rules), learned (n-grams and sentence embeddings, "
            "prompts/refusal_classifier.npz) or judge (the served model)."
        ),
    ] = "rules",
    llm_url: LlmUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Accuracy and confusion matrix of a refusal classifier against human labels."""
    from agentkit.llm import connect
    from agentkit.refusal import RefusalJudge, validate_refusal
    from agentkit.refusal_model import RefusalClassifier

    require_choices(split=(split, ("all", "tuning", "held_out")),
                    classifier=(classifier, ("rules", "learned", "judge")))  # fmt: skip
    with reported_errors(), ExitStack() as stack:
        if classifier == "judge":
            model = stack.enter_context(connect(get_settings(llm_url=llm_url)))
            judge: Any = RefusalJudge(model)
        elif classifier == "learned":
            judge = RefusalClassifier.load()  # no fallback: an unloadable model is an error
        report = validate_refusal(
            data,
            None if classifier == "rules" else lambda q, a: judge.classify(q, a).label,
            split=split,  # type: ignore[arg-type]
        )
    if classifier == "learned" and judge.in_sample(split):
        report["in_sample"] = True
        errors.print(
            f"note: the learned classifier was trained on {judge.trained_on} of XSTest's labelled "
            "completions, so this accuracy is in-sample; its cross-validated accuracy is in "
            "benchmarks/results/refusal_classifier.json",
            highlight=False,
        )
    print_json({"classifier": classifier, **report}, indent=2 if not as_json else None)


@app.command("react")
def react_command(
    question: Annotated[str, typer.Argument(help="The question.")],
    index: IndexOption = None,
    llm_url: LlmUrlOption = None,
    max_steps: Annotated[int, typer.Option(min=1, max=50)] = 8,
    no_structured: Annotated[bool, typer.Option(help="Parse steps without a regex.")] = False,
    mode: Annotated[
        str, typer.Option(help="text (Thought/Action) or tools (tool calls).")
    ] = "text",
    mcp: Annotated[
        list[str] | None,
        typer.Option(
            "--mcp",
            help="An MCP server whose tools the agent may call: a command (stdio) or an "
            "http(s) URL (streamable HTTP); repeatable; added to AGENTKIT_MCP_SERVERS.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Answer with a ReAct agent (search / lookup / finish over the index, and the tools of any
    MCP servers), showing each step."""
    from agentkit.llm import connect
    from agentkit.react import ReAct, Step
    from agentkit.retrievers import Index

    def show(step: Step) -> None:
        if not as_json:
            console.print(
                f"[dim]Thought:[/] {step.thought}\n[bold]Action:[/] {step.action}"
                f"[{step.argument}]\n[dim]Observation:[/] {step.observation[:300]}\n",
                highlight=False,
            )

    with reported_errors(), ExitStack() as stack:
        settings = get_settings(llm_url=llm_url)
        servers = [*settings.mcp_servers, *(mcp or [])]
        opened = None  # with MCP servers, the index is optional
        if index is not None or settings.index.exists() or not servers:
            opened = stack.enter_context(Index.open(index, settings=settings))
        model = stack.enter_context(connect(settings))
        agent = stack.enter_context(
            ReAct(
                model,
                index=opened,
                max_steps=max_steps,
                structured=not no_structured,
                on_step=show,
                mode=mode,
                mcp_servers=servers,
            )
        )
        result = agent.run(question)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(
        f"[bold]Answer:[/] {result.answer}" + (" (fallback: RAG)" if result.fallback else ""),
        highlight=False,
    )


@app.command("mcp")
def mcp_command(index: IndexOption = None, llm_url: LlmUrlOption = None) -> None:
    """Serve agentkit to MCP clients over stdio: tools search, ask, solve and react, and the
    index's documents as resources (`agentkit serve` offers the same at /mcp)."""
    from agentkit.agents import AgentContext
    from agentkit.errors import ConfigError
    from agentkit.guardrails import Guardrails
    from agentkit.llm import connect
    from agentkit.retrievers import Index
    from agentkit.tools.sandbox import Sandbox

    with reported_errors(), ExitStack() as stack:
        try:
            from agentkit.services.mcp_server import create_mcp_server
        except ImportError:
            hint = "pip install 'agentkit[mcp]'"
            raise ConfigError(f"`agentkit mcp` needs the MCP SDK: {hint}") from None
        from agentkit.services.api_state import relative_paths

        settings = get_settings(llm_url=llm_url)
        opened = None
        if index or settings.index.exists():
            opened = stack.enter_context(Index.open(index, settings=settings))
        model = stack.enter_context(connect(settings))
        sandbox = stack.enter_context(Sandbox())
        rails = Guardrails.from_settings(settings, model)
        context = AgentContext(model, settings, index=opened, sandbox=sandbox, guardrails=rails)
        bases = [opened.path] if opened is not None else []
        server = create_mcp_server(context, lambda text: relative_paths(text, bases))
        server.run("stdio")  # stdout is the protocol's: nothing else may print there


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    index: IndexOption = None,
    llm_url: LlmUrlOption = None,
    with_model: Annotated[bool, typer.Option(help="Start the embedded model server too.")] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, max=256, help="Worker processes (AGENTKIT_API_WORKERS); they share the database."
        ),
    ] = None,
) -> None:
    """Serve the chat REST API (OpenAI-compatible) over the index and the model.

    SIGTERM or Ctrl-C stops it: open chat requests get AGENTKIT_API_SHUTDOWN_GRACE_S more
    seconds, then streams end with an error event; a second signal exits at once (status 1).
    With --workers N, N processes serve the port and share conversations, feedback, keys, jobs
    and rate limits through the database (AGENTKIT_DATABASE_URL, else the SQLite files).
    """
    from agentkit.llm import connect
    from agentkit.retrievers import Index
    from agentkit.services.api import ApiConfig, create_app, serve
    from agentkit.services.model_server import ModelServer, ServeOptions
    from agentkit.services.workers import open_stores, serve_workers

    server = None
    clean = True
    with reported_errors(), ExitStack() as stack:
        settings = get_settings(llm_url=llm_url)
        if with_model:
            server = ModelServer(ServeOptions(port=settings.model_port), settings.cache_dir)
            stack.callback(lambda: server.stop(grace_s=20.0 if clean else 0.0))  # type: ignore[union-attr]
            settings = get_settings(llm_url=server.start())
        count = workers or settings.api_workers
        if count > 1:
            environment = {"AGENTKIT_API_WORKERS": str(count)}
            if index:
                environment["AGENTKIT_INDEX"] = str(Path(index).resolve())
            if settings.llm_url:
                environment["AGENTKIT_LLM_URL"] = settings.llm_url
            settings = get_settings(api_workers=count, llm_url=settings.llm_url)
            serve_workers(settings, host, port, environment=environment)
            return
        opened = None
        if index or settings.index.exists():
            opened = Index.open(index, settings=settings)
        stores = open_stores(settings)
        stack.callback(stores.close)
        app_ = create_app(
            connect(settings),
            opened,
            feedback=stores.feedback,
            config=ApiConfig.from_settings(settings),
            conversations=stores.conversations,
            settings=settings,
            shared=stores.shared,
        )
        app_.state.api.context.mcp_connections()  # AGENTKIT_MCP_SERVERS connect now, or fail
        # A forced exit must not leave the model server behind: it runs in a session of its own.
        clean = serve(app_, host, port, on_forced_exit=server and partial(server.stop, grace_s=0))
    if not clean:
        raise typer.Exit(1)


@app.command("chat")
def chat_command(
    index: IndexOption = None,
    llm_url: LlmUrlOption = None,
    api_url: Annotated[
        str | None, typer.Option(help="Chat through a running agentkit API.")
    ] = None,
    mode: Annotated[str, typer.Option(help="rag, pal or react.")] = "rag",
) -> None:
    """Interactive chat: /mode rag|pal|react, /sources, /history, /quit."""
    import uuid

    from agentkit.client import Client

    state = {"mode": mode, "sources": [], "history": []}
    conversation = uuid.uuid4().hex

    def answer_in_process(question: str) -> tuple[str, list[str]]:
        from agentkit.agents import AgentContext, AgentRequest, get_agent, run_agent
        from agentkit.guardrails import Guardrails
        from agentkit.llm import connect
        from agentkit.retrievers import Index

        settings = get_settings(llm_url=llm_url)
        name = f"agentkit-{state['mode']}"
        with connect(settings) as model, ExitStack() as stack:
            opened = None
            if get_agent(name).needs_index:
                opened = stack.enter_context(Index.open(index, settings=settings))
            rails = Guardrails.from_settings(settings, model)  # AGENTKIT_GUARD*, _REVISE
            context = AgentContext(model, settings, index=opened, guardrails=rails)
            result = run_agent(name, context, AgentRequest.ask(question))
        citations = result.data.get("citations", [])
        return result.text, [f"[{c['number']}] {relative(c['location'])}" for c in citations]

    def answer_remote(question: str) -> tuple[str, list[str]]:
        with Client(api_url) as client:  # type: ignore[arg-type]
            reply = client.chat(
                question, model=f"agentkit-{state['mode']}", conversation_id=conversation
            )
        return reply.text, [f"[{c['number']}] {relative(c['location'])}" for c in reply.citations]

    console.print("[bold]agentkit chat[/] — /mode rag|pal|react, /sources, /history, /quit")
    while True:
        try:
            line = console.input(f"[bold cyan]{state['mode']}>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/mode"):
            choice = line.split()[-1]
            if choice in ("rag", "pal", "react"):
                state["mode"] = choice
            else:
                errors.print("modes: rag, pal, react")
            continue
        if line == "/sources":
            console.print("\n".join(state["sources"]) or "no sources", highlight=False)
            continue
        if line == "/history":
            for q, a in state["history"]:
                console.print(f"[bold]you:[/] {q}\n[bold]agentkit:[/] {a}", highlight=False)
            continue
        try:
            text, sources = (answer_remote if api_url else answer_in_process)(line)
        except AgentkitError as error:
            errors.print(f"[bold red]error:[/] {error}", highlight=False)
            continue
        state["sources"] = sources
        state["history"].append((line, text))
        console.print(text, highlight=False, markup=False)


keys_app = typer.Typer(
    help="API keys kept in the database (beside AGENTKIT_API_KEYS): add, list, revoke.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@contextmanager
def key_store() -> Iterator[Any]:
    """The keys of AGENTKIT_DATABASE_URL, else of AGENTKIT_STATE_DB."""
    from agentkit.services.keys import KeyStore

    settings = get_settings()
    store = KeyStore(settings.database_url or settings.state_db)
    try:
        yield store
    finally:
        store.close()


@keys_app.command("add")
def keys_add_command(
    name: Annotated[str, typer.Argument(help="Who the key is for; owns what it makes.")],
    role: Annotated[str, typer.Option(help="user or admin.")] = "user",
    as_json: JsonOption = False,
) -> None:
    """Make a key for NAME and print it, once: only its hash is stored."""
    from agentkit.services.auth import parse_api_keys

    with reported_errors(), key_store() as store:
        configured = (get_settings().api_keys or "").split(",")
        taken = tuple(k.name for k in parse_api_keys([e for e in configured if e.strip()]))
        key = store.add(name, role, taken=taken)
    if as_json:
        print_json({"name": name, "role": role, "key": key})
        return
    console.print(f"{key}", highlight=False, markup=False)
    errors.print(f"key for {name} ({role}); it is not shown again: keep it now", highlight=False)


@keys_app.command("list")
def keys_list_command(
    revoked: Annotated[bool, typer.Option(help="Show revoked keys too.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The keys in the database (never the keys themselves)."""
    with reported_errors(), key_store() as store:
        keys = store.list(revoked=revoked)
    if as_json:
        print_json([k.to_dict() for k in keys])
        return
    for k in keys:
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created))
        state = " revoked" if k.revoked else ""
        console.print(f"{k.name}\t{k.role}\t{made}{state}", highlight=False, markup=False)


@keys_app.command("revoke")
def keys_revoke_command(name: Annotated[str, typer.Argument()]) -> None:
    """Revoke NAME's key (workers notice within a few seconds); its records stay."""
    with reported_errors(), key_store() as store:
        store.revoke(name)
    errors.print(f"revoked the key of {name}", highlight=False)


feedback_app = typer.Typer(
    help="Feedback: labeling tasks, AI labels (RLAIF), pairwise export.", no_args_is_help=True
)
app.add_typer(feedback_app, name="feedback")
tasks_app = typer.Typer(
    help="Labeling tasks: prompts with N completions each, for labelers to rank on the web page.",
    no_args_is_help=True,
)
feedback_app.add_typer(tasks_app, name="tasks")


@contextmanager
def labeling_store() -> Iterator[Any]:
    """The labeling tasks, in the feedback database (AGENTKIT_FEEDBACK_DB)."""
    from agentkit.services.feedback import FeedbackStore
    from agentkit.services.labeling import LabelingStore

    settings = get_settings()
    feedback = FeedbackStore(settings.database_url or settings.feedback_db)
    try:
        store = LabelingStore(feedback)
        try:
            yield store
        finally:
            store.close()
    finally:
        feedback.close()


def sample_with_progress(store: Any, context: Any, task_id: str, shown: bool) -> dict[str, Any]:
    """Sample the task's waiting prompts, with a progress bar on a terminal."""
    from agentkit.services.labeling import sample_task

    if not shown:
        return sample_task(store, context, task_id)
    columns = (TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=errors, transient=True) as progress:
        bar = progress.add_task("sample", total=len(store.pending(task_id)))

        def update(done: int, total: int) -> None:
            progress.update(bar, completed=done)

        return sample_task(store, context, task_id, progress=update)


def print_task(task: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(task)
        return
    console.print(
        f"[bold]{task['id']}[/] {task['name']}: {task['ready']} of {task['prompts']} prompts ready "
        f"({task['n']} completions each, {task['labelers_per_prompt']} labeler(s) per prompt), "
        f"{task['rankings']} of {task['rankings_needed']} rankings",
        highlight=False,
    )
    for failure in task["failures"]:
        errors.print(f"  prompt {failure['prompt']} failed: {failure['error']}", highlight=False)


@tasks_app.command("add")
def tasks_add_command(
    file: Annotated[Path, typer.Argument(help='JSONL file: one {"prompt": "..."} a line.')],
    agent: Annotated[
        str, typer.Option(help="agentkit-rag, agentkit-pal, agentkit-react or the served model.")
    ] = "agentkit-rag",
    n: Annotated[int, typer.Option("--n", min=2, max=16, help="Completions per prompt.")] = 4,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.8,
    labelers: Annotated[
        int, typer.Option("--labelers", min=1, max=50, help="Labelers each prompt needs (k).")
    ] = 1,
    name: Annotated[str | None, typer.Option(help="The task's name on the page.")] = None,
    index: IndexOption = None,
    llm_url: LlmUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a labeling task and sample N completions of each prompt with the agent (one
    request with n when the agent is the served model). Labelers rank them on the page."""
    from agentkit.agents import AgentContext, get_agent
    from agentkit.llm import connect
    from agentkit.retrievers import Index
    from agentkit.services.labeling import read_prompts

    with reported_errors(), ExitStack() as stack:
        try:
            text = file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise AgentkitError(f"cannot read {file}: {error}; give a UTF-8 JSONL file") from None
        prompts = read_prompts(text, source=str(file))
        settings = get_settings(llm_url=llm_url)
        opened = None
        if get_agent(agent).needs_index:
            opened = stack.enter_context(Index.open(index, settings=settings))
        model = stack.enter_context(connect(settings))
        model.context_length()  # the model server answers before a task is stored
        store = stack.enter_context(labeling_store())
        task = store.create_task(
            prompts,
            agent=agent,
            n=n,
            temperature=temperature,
            labelers_per_prompt=labelers,
            name=name,
        )
        context = AgentContext(model, settings, index=opened)
        task = sample_with_progress(store, context, task["id"], not as_json and errors.is_terminal)
    print_task(task, as_json)


@tasks_app.command("list")
def tasks_list_command(as_json: JsonOption = False) -> None:
    """The labeling tasks with their progress."""
    with reported_errors(), labeling_store() as store:
        tasks = store.tasks()
    if as_json:
        print_json(tasks)
        return
    for task in tasks:
        print_task(task, False)
    if not tasks:
        console.print("no labeling tasks; create one with `agentkit feedback tasks add FILE`")


@tasks_app.command("delete")
def tasks_delete_command(task_id: Annotated[str, typer.Argument(help="The task's id.")]) -> None:
    """Delete a labeling task: its prompts, completions and rankings (the feedback its rankings
    gave stays in the store and its export)."""
    with reported_errors(), labeling_store() as store:
        task = store.delete_task(task_id)
    console.print(f"deleted task {task['id']} ({task['name']}, {task['rankings']} rankings)")


@feedback_app.command("ai-label")
def ai_label_command(
    file: Annotated[Path, typer.Argument(help='JSONL file: one {"prompt": "..."} a line.')],
    agent: Annotated[
        str, typer.Option(help="agentkit-rag, agentkit-pal, agentkit-react or the served model.")
    ] = "agentkit-rag",
    n: Annotated[int, typer.Option("--n", min=2, max=8, help="Answers per prompt.")] = 4,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.8,
    dry_run: Annotated[bool, typer.Option(help="Judge, but store nothing.")] = False,
    index: IndexOption = None,
    llm_url: LlmUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rank N sampled answers per prompt by the constitution with the judge (both orders of
    every pair) and store the rankings as feedback of labeler ai:<model>."""
    from agentkit.agents import AgentContext, get_agent
    from agentkit.ai_feedback import ai_label
    from agentkit.llm import connect
    from agentkit.retrievers import Index
    from agentkit.services.feedback import FeedbackStore
    from agentkit.services.labeling import read_prompts

    with reported_errors(), ExitStack() as stack:
        try:
            text = file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise AgentkitError(f"cannot read {file}: {error}; give a UTF-8 JSONL file") from None
        prompts = read_prompts(text, source=str(file))
        settings = get_settings(llm_url=llm_url)
        opened = None
        if get_agent(agent).needs_index:
            opened = stack.enter_context(Index.open(index, settings=settings))
        model = stack.enter_context(connect(settings))
        model.context_length()  # the model server answers before anything is sampled
        store = None
        if not dry_run:
            store = FeedbackStore(settings.feedback_db)
            stack.callback(store.close)
        shown = not as_json and errors.is_terminal
        report = ai_label(
            AgentContext(model, settings, index=opened),
            prompts,
            agent=agent,
            n=n,
            temperature=temperature,
            store=store,
            progress=(lambda i, total: errors.print(f"{i}/{total}", end="\r")) if shown else None,
        )
    if as_json:
        print_json(report)
        return
    console.print(
        f"{report['ranked']} of {report['prompts']} prompts ranked by {report['labeler']} "
        f"({report['stored']} stored), {report['skipped']} skipped, {report['failed']} failed; "
        f"position consistency {report['position_consistency']}",
        highlight=False,
    )
    for outcome in report["outcomes"]:
        if outcome["status"] != "ranked":
            errors.print(f"  {outcome['status']}: {outcome['prompt'][:60]!r}: {outcome['error']}",
                         highlight=False, markup=False)  # fmt: skip


@feedback_app.command("export")
def feedback_export_command(
    kind: Annotated[str, typer.Option(help="human, ai or all (by labeler ai:<model>).")] = "all",
) -> None:
    """Pairwise preferences {prompt, chosen, rejected} as JSONL on stdout."""
    from agentkit.services.feedback import FeedbackStore

    if kind not in ("human", "ai", "all"):
        errors.print("[bold red]error:[/] --kind must be human, ai or all")
        raise typer.Exit(2)
    with reported_errors():
        store = FeedbackStore(get_settings().feedback_db)
        try:
            pairs = store.pairwise(kind=kind)
        finally:
            store.close()
    for pair in pairs:
        sys.stdout.write(json.dumps(pair, ensure_ascii=False) + "\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
