"""`agentkit model serve`'s parallelism and LoRA options: the vLLM command lines they build."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from agentkit.errors import ModelServerError
from agentkit.services import model_server
from agentkit.services.model_server import ServeOptions, build_command, parse_lora

MODEL = "Qwen/Qwen2.5-7B-Instruct"


def flags(options: ServeOptions) -> list[str]:
    return build_command(options, MODEL, MODEL, "cuda")


def value_of(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_one_model_on_n_gpus_and_n_copies_of_it() -> None:
    command = flags(ServeOptions(tensor_parallel_size=4, pipeline_parallel_size=2,
                                 data_parallel_size=3))  # fmt: skip
    assert value_of(command, "--tensor-parallel-size") == "4"
    assert value_of(command, "--pipeline-parallel-size") == "2"
    assert value_of(command, "--data-parallel-size") == "3"


def test_defaults_add_no_parallel_or_lora_flags() -> None:
    command = flags(ServeOptions())
    for absent in ("--pipeline-parallel-size", "--data-parallel-size", "--enable-lora",
                   "--lora-modules"):  # fmt: skip
        assert absent not in command


def test_lora_adapters_are_served_under_their_names() -> None:
    adapters = parse_lora(["sql=/adapters/sql", "support=org/support-lora"])
    command = flags(ServeOptions(lora=adapters, max_lora_rank=64))
    assert "--enable-lora" in command and value_of(command, "--max-loras") == "2"
    at = command.index("--lora-modules")
    assert command[at + 1 : at + 3] == ["sql=/adapters/sql", "support=org/support-lora"]
    assert value_of(command, "--max-lora-rank") == "64"


@pytest.mark.parametrize(
    ("entries", "message"),
    [(["sql"], "write NAME=PATH"), (["=/x"], "write NAME=PATH"), (["a b=/x"], "write NAME=PATH"),
     (["sql=/a", "sql=/b"], "twice")],
)  # fmt: skip
def test_malformed_lora_entries_are_refused(entries: list[str], message: str) -> None:
    with pytest.raises(ModelServerError, match=message):
        parse_lora(entries)


def test_the_cli_passes_the_options_through(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkit.cli import app

    seen: dict[str, Any] = {}

    class Recorded:
        def __init__(self, options: ServeOptions, cache_dir: object) -> None:
            seen["command"] = build_command(options, MODEL, MODEL, "cuda")
            self.log_file = "log"

        def start(self, report: object = None) -> str:
            raise ModelServerError("not started in this test")

        def stop(self, grace_s: float = 0) -> None:
            pass

    monkeypatch.setattr(model_server, "ModelServer", Recorded)
    result = CliRunner().invoke(
        app,
        ["model", "serve", "--model", MODEL, "--tensor-parallel-size", "2",
         "--pipeline-parallel-size", "2", "--data-parallel-size", "2",
         "--lora", "sql=/adapters/sql", "--lora", "chat=/adapters/chat"],
    )  # fmt: skip
    assert result.exit_code == 1 and "not started in this test" in result.output
    command = seen["command"]
    assert value_of(command, "--data-parallel-size") == "2"
    assert value_of(command, "--pipeline-parallel-size") == "2"
    assert "sql=/adapters/sql" in command and "chat=/adapters/chat" in command
    bad = CliRunner().invoke(app, ["model", "serve", "--lora", "nopath"])
    assert bad.exit_code == 1 and "NAME=PATH" in bad.output
