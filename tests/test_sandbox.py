"""The sandbox on ordinary and bad programs: clear result objects, never a crash or a hang."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentkit.cli import app
from agentkit.tools.sandbox import Sandbox, precheck


@pytest.fixture(scope="module")
def box():
    with Sandbox(timeout_s=2, memory_mb=128, max_output_chars=1000) as sandbox:
        yield sandbox


def run(box: Sandbox, body: str, **kw):
    return box.run(
        "def solution():\n" + "\n".join("    " + line for line in body.splitlines()), **kw
    )


def test_a_program_returns_its_value_and_stdout(box: Sandbox) -> None:
    result = box.run(
        "import math\ndef solution():\n    print('thinking')\n    return math.gcd(12, 18)"
    )
    assert (result.value, result.stdout, result.error, result.ok) == (6, "thinking\n", None, True)
    assert 0 < result.duration_ms < 2000


@pytest.mark.parametrize(
    ("body", "value"),
    [
        ("from fractions import Fraction\nreturn Fraction(3, 4)", 0.75),
        ("return (1, 2)", [1, 2]),
        ("return {3, 1}", [1, 3]),
        ("return {1: 'a'}", {"1": "a"}),
        ("return 2 ** 70", str(2**70)),
        ("return float('inf')", "inf"),
        ("from decimal import Decimal\nreturn Decimal('2.5')", 2.5),
    ],
)
def test_values_that_are_not_plain_json_are_converted_and_flagged(box, body, value) -> None:
    result = run(box, body)
    assert result.ok and result.value == value and result.converted


def test_an_object_without_a_json_form_comes_back_as_its_repr(box: Sandbox) -> None:
    result = box.run(
        "class A:\n    def __repr__(self):\n        return 'A()'\ndef solution():\n    return A()"
    )
    assert result.ok and result.value == "A()" and result.converted


@pytest.mark.parametrize(
    ("code", "error_type", "message"),
    [
        ("def solution(:\n    return 1", "syntax", "syntax error"),
        ("def answer():\n    return 1", "no_entry", "def solution()"),
        ("import os\ndef solution():\n    return 1", "import_not_allowed", "'os' is not allowed"),
        ("def solution():\n    return eval('1')", "forbidden", "eval"),
        ("def solution():\n    return ().__class__", "forbidden", "__class__"),
        (
            "def solution():\n    return 1 / 0",
            "exception",
            "ZeroDivisionError: division by zero (line 2)",
        ),
    ],
)
def test_bad_programs_get_clear_errors(box, code, error_type, message) -> None:
    result = box.run(code)
    assert result.error_type == error_type and message in (result.error or ""), result


def test_an_infinite_loop_is_killed_at_the_timeout_and_the_worker_lives_on(box: Sandbox) -> None:
    started = time.monotonic()
    result = run(box, "while True:\n    pass", timeout_s=0.5)
    assert result.error_type == "timeout" and time.monotonic() - started < 2.5
    assert run(box, "return 1").value == 1


def test_printing_gigabytes_stops_at_the_output_cap(box: Sandbox) -> None:
    result = run(box, "while True:\n    print('x' * 10**6)")
    assert result.error_type == "output_limit" and len(result.stdout) == 1000
    assert result.stdout_truncated


def test_a_memory_bomb_hits_the_memory_limit(box: Sandbox) -> None:
    result = run(box, "x = [0] * (10**9)\nreturn len(x)")
    assert result.error_type == "memory_limit"


def test_programs_never_see_each_others_state(box: Sandbox) -> None:
    assert box.run("import math\ndef solution():\n    math.tau = 1\n    return math.tau").value == 1
    assert box.run("import math\ndef solution():\n    return math.tau").value == pytest.approx(
        6.2832, 1e-4
    )


def test_files_may_be_written_in_the_scratch_directory_only(box: Sandbox) -> None:
    code = (
        "def solution():\n    with open('notes.txt', 'w') as f:\n        f.write('hi')\n"
        "    return open('notes.txt').read()"
    )
    unguarded = Sandbox(precheck=False, python_guards=False)
    try:
        inside = unguarded.run(code)
        if unguarded.landlock_abi:
            assert inside.value == "hi", inside
        else:  # no Landlock in this kernel: seccomp refuses every open(), scratch included
            assert "Operation not permitted" in (inside.error or "")
        outside = unguarded.run("def solution():\n    open('/tmp/agentkit-x', 'w')\n    return 1")
        assert outside.error_type == "exception"
        assert "Permission denied" in outside.error or "not permitted" in outside.error
        assert not Path("/tmp/agentkit-x").exists()
    finally:
        unguarded.close()


def test_the_environment_is_clean(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTKIT_TEST_SECRET", "hunter2")
    with Sandbox(precheck=False, python_guards=False) as fresh:
        result = fresh.run("import os\ndef solution():\n    return dict(os.environ)")
    assert result.ok and "hunter2" not in json.dumps(result.value)


def test_precheck_accepts_ordinary_pal_programs() -> None:
    code = (
        "from collections import Counter\nimport math\n\ndef solution():\n"
        "    # eggs per day\n    eggs = 16 - 3 - 4\n    return eggs * 2\n"
    )
    assert precheck(code, {"math", "collections"}) is None


def test_cli_prints_the_result_as_json(tmp_path: Path) -> None:
    program = tmp_path / "p.py"
    program.write_text("def solution():\n    return 1 / 0\n")
    result = CliRunner().invoke(app, ["sandbox", "run", str(program), "--timeout", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["error_type"] == "exception" and "ZeroDivisionError" in data["error"]
    missing = CliRunner().invoke(app, ["sandbox", "run", str(tmp_path / "nope.py")])
    assert missing.exit_code == 1 and "is not a file" in missing.output


def test_the_python_tool_runs_expressions_and_programs_for_agents(box: Sandbox) -> None:
    from agentkit.react import ReAct
    from agentkit.testing import ScriptedChatModel
    from agentkit.tools.sandbox import python_tool

    python = python_tool(box)
    assert python("17 * 23 + 4") == "395"
    assert python("def solution():\n    return [1, 2]") == "[1, 2]"
    assert python("__import__('os')").startswith("Error (forbidden)")
    model = ScriptedChatModel(
        ["Thought: t\nAction: python[2 ** 10]", "Thought: t\nAction: finish[1024]"]
    )
    result = ReAct(model, [python]).run("What is 2 to the 10th?")
    assert result.steps[0].observation == "1024" and result.answer == "1024"
