"""Run untrusted Python (PAL programs, code tools) in a sandbox nothing escapes.

    result = Sandbox().run("def solution():\\n    return 6 * 7")
    result.value  # 42

Two layers. ``precheck`` parses the program (never runs it) and refuses the common escapes
with a clear message: imports outside the allowlist, ``exec``/``eval``/``open``/``__import__``
and friends, and any ``_private`` or ``__dunder__`` attribute. The real guarantee is the
OS-level confinement of ``sandbox_worker.py`` (its docstring says which mechanisms and why):
it holds when the pre-check is bypassed or switched off.
"""

from __future__ import annotations

import ast
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentkit.errors import SandboxError
from agentkit.processes import kill_group

DEFAULT_IMPORTS = frozenset(
    "math cmath fractions decimal statistics itertools functools collections datetime re "
    "string heapq bisect random".split()
)
OPT_IN_IMPORTS = frozenset({"numpy", "sympy"})
FORBIDDEN_CALLS = frozenset(
    "exec eval compile open __import__ globals locals vars getattr setattr delattr breakpoint "
    "input help memoryview type".split()
)
FORBIDDEN_ATTRIBUTES = frozenset(
    "f_back f_globals f_locals f_builtins f_code tb_frame tb_next gi_frame gi_code cr_frame "
    "cr_code ag_frame mro format_map".split()
)
WORKER = Path(__file__).with_name("sandbox_worker.py")


@dataclass
class SandboxResult:
    value: Any = None
    stdout: str = ""
    error: str | None = None
    error_type: str | None = None  # which rule or limit stopped it; None when it ran clean
    duration_ms: float = 0.0
    stdout_truncated: bool = False
    converted: bool = False  # the value was not plain JSON data and was converted

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Limits:
    timeout_s: float = 5.0
    memory_mb: int = 256
    max_output_chars: int = 64_000
    allowed_imports: frozenset[str] = field(default_factory=lambda: DEFAULT_IMPORTS)


def precheck(
    code: str, allowed_imports: Iterable[str], entry: str = "solution"
) -> SandboxResult | None:
    """A clear refusal for the common escapes, or ``None`` when the program may run."""
    try:
        tree = ast.parse(code)
    except SyntaxError as error:
        return SandboxResult(
            error=f"syntax error: {error.msg} (line {error.lineno})", error_type="syntax"
        )
    allowed = set(allowed_imports)

    def refuse(node: ast.AST, why: str, kind: str = "forbidden") -> SandboxResult:
        return SandboxResult(error=f"{why} (line {getattr(node, 'lineno', '?')})", error_type=kind)

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for name in names:
                if getattr(node, "level", 0) or name.split(".")[0] not in allowed:
                    allowed_list = ", ".join(sorted(allowed))
                    return refuse(
                        node,
                        f"import of {name or '.'!r} is not allowed; allowed: {allowed_list}",
                        "import_not_allowed",
                    )
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_CALLS:
            return refuse(node, f"{node.id} is not available in the sandbox")
        elif isinstance(node, ast.Name) and node.id.startswith("__") and node.id != "__name__":
            return refuse(node, f"{node.id} is not available in the sandbox")
        elif isinstance(node, ast.Attribute) and (
            node.attr.startswith("_") or node.attr in FORBIDDEN_ATTRIBUTES
        ):
            return refuse(node, f"attribute {node.attr!r} is not allowed in the sandbox")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "{" in node.value:
            if "._" in node.value or ".__" in node.value or "[_" in node.value:
                return refuse(node, "format strings may not reach private attributes")
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if entry not in defined:
        return SandboxResult(
            error=f"the program defines no function {entry}(): write `def {entry}():` that "
            "returns the answer",
            error_type="no_entry",
        )
    return None


class Sandbox:
    """A warm worker process that runs each program in a fresh, confined child.

    Thread-safe: runs are serialised on the one worker; make several Sandboxes for parallelism.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 5.0,
        memory_mb: int = 256,
        max_output_chars: int = 64_000,
        allowed_imports: Iterable[str] = DEFAULT_IMPORTS,
        precheck: bool = True,
        python_guards: bool = True,
        landlock: bool = True,
    ) -> None:
        """``precheck``/``python_guards`` off leave only the OS layers (the security tests do)."""
        self.limits = Limits(timeout_s, memory_mb, max_output_chars, frozenset(allowed_imports))
        self.use_precheck = precheck
        self.python_guards = python_guards
        self.use_landlock = landlock  # off: the fallback for kernels without it (tests)
        self.landlock_abi = 0
        self.runs = 0
        self.limit_hits: dict[str, int] = {}
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the worker now (otherwise the first run does it, ~50 ms)."""
        with self._lock:
            self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        self._process = subprocess.Popen(
            [sys.executable, "-I", str(WORKER), *([] if self.use_landlock else ["--no-landlock"])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
        hello = self._read(time.monotonic() + 30)
        if not hello or not hello.get("ready"):
            self._kill()
            raise SandboxError(
                "the sandbox worker did not start: is pyseccomp installed and "
                "libseccomp.so.2 present (Debian: apt install libseccomp2)?"
            )
        self.landlock_abi = int(hello.get("landlock_abi", 0))

    def _read(self, deadline: float) -> dict[str, Any] | None:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        data = b""
        need = 4
        header_done = False
        while len(data) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, need - len(data))
            if not chunk:
                return None
            data += chunk
            if not header_done and len(data) == 4:
                need = 4 + struct.unpack(">I", data)[0]
                header_done = True
        return json.loads(data[4:])

    def _kill(self) -> None:
        if self._process is not None:
            kill_group(self._process)
            self._process = None

    def run(
        self,
        code: str,
        *,
        entry: str = "solution",
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        allowed_imports: Iterable[str] | None = None,
    ) -> SandboxResult:
        """Run ``code``, call ``entry()``; a result always, never an exception for the program."""
        timeout_s = float(timeout_s if timeout_s is not None else self.limits.timeout_s)
        memory_mb = int(memory_mb if memory_mb is not None else self.limits.memory_mb)
        allowed = frozenset(
            allowed_imports if allowed_imports is not None else self.limits.allowed_imports
        )
        if timeout_s <= 0 or memory_mb < 16:
            raise SandboxError("timeout_s must be > 0 and memory_mb at least 16")
        started = time.perf_counter()
        if self.use_precheck and (refused := precheck(code, allowed, entry)) is not None:
            refused.duration_ms = (time.perf_counter() - started) * 1000
            return self._count(refused)
        request = {
            "code": code,
            "entry": entry,
            "timeout_s": timeout_s,
            "memory_mb": memory_mb,
            "max_output": self.limits.max_output_chars,
            "allowed_imports": sorted(allowed),
            "preload": sorted(allowed & OPT_IN_IMPORTS),
            "python_guards": self.python_guards,
        }
        payload = json.dumps(request).encode()
        with self._lock:
            self._ensure_worker()
            assert self._process is not None and self._process.stdin is not None
            try:
                self._process.stdin.write(struct.pack(">I", len(payload)) + payload)
                self._process.stdin.flush()
                reply = self._read(time.monotonic() + timeout_s + 10)
            except (BrokenPipeError, OSError):
                reply = None
            if reply is None:  # the worker itself failed or hung: replace it
                self._kill()
                return self._count(
                    SandboxResult(
                        error="the sandbox worker stopped answering and was restarted",
                        error_type="sandbox",
                        duration_ms=(time.perf_counter() - started) * 1000,
                    )
                )
        fields = SandboxResult.__dataclass_fields__
        result = SandboxResult(**{k: v for k, v in reply.items() if k in fields})
        return self._count(result)

    def _count(self, result: SandboxResult) -> SandboxResult:
        self.runs += 1
        if result.error_type:
            self.limit_hits[result.error_type] = self.limit_hits.get(result.error_type, 0) + 1
        return result

    def close(self) -> None:
        with self._lock:
            self._kill()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:
            pass


def python_tool(sandbox: Sandbox | None = None) -> Any:
    """A ``python[...]`` tool for agents: a ``def solution():`` program, or one expression
    (``python[17 * 23 + 4]``); the result, or the sandbox's error, is the observation."""
    from agentkit.tools.registry import tool

    box = sandbox or Sandbox()

    @tool(name="python")
    def run_python(code: str) -> str:
        """python[code]: run a def solution(): program or one expression in the sandbox."""
        program = code if "def solution" in code else f"def solution():\n    return ({code})\n"
        result = box.run(program)
        if not result.ok:
            return f"Error ({result.error_type}): {result.error}"
        return json.dumps(result.value, ensure_ascii=False)

    return run_python
