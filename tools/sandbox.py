"""Run untrusted Python (PAL programs, code tools) in a sandbox nothing escapes.

    result = Sandbox().run("def solution():\\n    return 6 * 7")
    result.value  # 42

Two layers. ``precheck`` parses the program (never runs it) and refuses the common escapes
with a clear message: imports outside the allowlist, ``exec``/``eval``/``open``/``__import__``
and friends, and any ``_private`` or ``__dunder__`` attribute. The real guarantee is the
OS-level confinement: the worker runs unprivileged in its own namespaces
(``sandbox_launch.py``), and each program's child adds rlimits, Landlock and a seccomp allowlist
(``sandbox_worker.py``, ``sandbox_policy.py``). It holds when the pre-check is bypassed or
switched off.
"""

from __future__ import annotations

import ast
import json
import os
import select
import struct
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from agentkit.errors import SandboxError
from agentkit.processes import kill_group
from agentkit.tools.sandbox_launch import ENV, Layers, missing_tools, worker_command
from agentkit.tools.sandbox_worker import REPLY_CAP, check_reply

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
WORKER_MARGIN_S = 5.0  # the worker answers by the program's deadline; this is for a stuck one
CANCEL_POLL_S = 0.05  # how often a waiting run looks at its cancel event


@dataclass
class SandboxResult:
    value: Any = None
    stdout: str = ""
    error: str | None = None
    error_type: str | None = None  # which rule or limit stopped it; None when it ran clean
    duration_ms: float = 0.0
    stdout_truncated: bool = False
    converted: bool = False  # the value was not plain JSON data and was converted
    isolation: str = ""  # the OS layers that confined the run; "weak: without ..." if any was off

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


class _Worker:
    """One warm worker process (its whole bubblewrap tree) and the pipes to it."""

    def __init__(self, layers: Layers, uid: int) -> None:
        self.process = subprocess.Popen(
            worker_command(layers, uid),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(ENV),
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
        frame = self.read(time.monotonic() + 30)
        try:
            hello = json.loads(frame) if frame else None
        except ValueError:
            hello = None
        if not isinstance(hello, dict) or not hello.get("ready"):
            why = self._stderr()
            self.kill()
            raise SandboxError(
                "the sandbox worker did not start"
                + (f": {why}" if why else "")
                + ". Without user namespaces (bubblewrap needs them: sysctl "
                "kernel.unprivileged_userns_clone=1, or a container run with them allowed) set "
                "AGENTKIT_SANDBOX_ALLOW_WEAK=1 to run with fewer layers, reported in each result"
            )
        assert self.process.stderr is not None
        self.process.stderr.close()  # the worker sends its stderr to /dev/null once it is up
        self.landlock_abi = int(hello.get("landlock_abi", 0))
        self.pidns = bool(hello.get("pidns"))

    def _stderr(self) -> str:
        """The last line the worker (or bubblewrap) wrote to stderr before it failed."""
        assert self.process.stderr is not None
        fd = self.process.stderr.fileno()
        if not select.select([fd], [], [], 1)[0]:
            return ""
        lines = os.read(fd, 8000).decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""

    def read(self, deadline: float, cancel: threading.Event | None = None) -> bytes | None:
        """One length-prefixed message, or ``None`` (deadline, cancelled, worker gone)."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        data = b""
        need = 4
        while len(data) < need:
            left = deadline - time.monotonic()
            if left <= 0 or (cancel is not None and cancel.is_set()):
                return None
            if not select.select([fd], [], [], min(left, CANCEL_POLL_S))[0]:
                continue
            chunk = os.read(fd, min(need - len(data), 1 << 20))
            if not chunk:
                return None
            data += chunk
            if need == 4 and len(data) == 4:
                need = 4 + struct.unpack(">I", data)[0]
                if need > REPLY_CAP + 4:
                    return None
        return data[4:]

    def send(self, payload: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(struct.pack(">I", len(payload)) + payload)
        self.process.stdin.flush()

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        kill_group(self.process)  # bubblewrap's --die-with-parent takes the namespaces along
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


class Sandbox:
    """A small pool of warm workers; each runs one program at a time in a fresh, confined child.

    Thread-safe: up to ``workers`` programs run at once, more wait for a free worker. The OS
    layers (namespaces through bubblewrap, a seccomp allowlist, Landlock) are required: when
    one cannot be set up, ``run`` raises ``SandboxError`` saying what is missing, unless
    ``allow_weak`` (or ``AGENTKIT_SANDBOX_ALLOW_WEAK=1``) opts into running without it, and every
    result then names the missing layers in ``isolation``.
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
        namespaces: bool = True,
        workers: int | None = None,
        allow_weak: bool | None = None,
        uid: int | None = None,
    ) -> None:
        """``precheck``/``python_guards`` off leave only the OS layers (the security tests do);
        ``landlock``/``namespaces`` off are explicit weakenings, reported in every result."""
        from agentkit.settings import get_settings

        settings = get_settings()
        self.limits = Limits(timeout_s, memory_mb, max_output_chars, frozenset(allowed_imports))
        self.use_precheck = precheck
        self.python_guards = python_guards
        self.layers = Layers(namespaces=namespaces, landlock=landlock)
        self.allow_weak = settings.sandbox_allow_weak if allow_weak is None else allow_weak
        self.uid = settings.sandbox_uid if uid is None else uid
        self.size = max(1, settings.sandbox_workers if workers is None else workers)
        self.landlock_abi = 0
        self.isolation = ""
        self.runs = 0
        self.limit_hits: dict[str, int] = {}
        self._lock = threading.Lock()  # guards the pool and the counters
        self._slots = threading.BoundedSemaphore(self.size)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._checked = False

    def start(self) -> None:
        """Start one worker now (otherwise the first run does it, ~0.1 s)."""
        with self._slots:
            self._release(self._take())

    def _check_layers(self) -> None:
        """Refuse, or weaken with the user's consent, when an OS layer cannot be had."""
        missing = missing_tools(self.layers)
        if missing and not self.allow_weak:
            raise SandboxError(
                "the sandbox cannot confine programs here: "
                + "; ".join(why for _, why in missing)
                + ". Install what is missing, or set AGENTKIT_SANDBOX_ALLOW_WEAK=1 to run "
                "untrusted code with fewer layers (each result then says which)"
            )
        self.layers = replace(self.layers, **{layer: False for layer, _ in missing})
        self._checked = True

    def _take(self) -> _Worker:
        with self._lock:
            if not self._checked:
                self._check_layers()
            worker = self._idle.pop() if self._idle else None
        if worker is not None and not worker.alive():
            worker.kill()  # died while idle: reap it and close its pipes before replacing it
            worker = None
        if worker is None:
            worker = _Worker(self.layers, self.uid)
            if self.layers.landlock and not worker.landlock_abi and not self.allow_weak:
                worker.kill()
                raise SandboxError(
                    "the sandbox cannot confine programs here: this kernel has no Landlock "
                    "(Linux ≥ 5.13 with lsm=landlock). Set AGENTKIT_SANDBOX_ALLOW_WEAK=1 to run "
                    "without it (file access is then refused by seccomp)"
                )
            with self._lock:
                self.landlock_abi = worker.landlock_abi
                self.isolation = describe(self.layers, worker)
        with self._lock:
            self._busy.add(worker)
        return worker

    def _release(self, worker: _Worker | None, broken: _Worker | None = None) -> None:
        with self._lock:
            for done in (worker, broken):
                if done is not None:
                    self._busy.discard(done)
            if worker is not None and len(self._idle) < self.size:
                self._idle.append(worker)
        if broken is not None:
            broken.kill()

    def run(
        self,
        code: str,
        *,
        entry: str = "solution",
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        allowed_imports: Iterable[str] | None = None,
        cancel: threading.Event | None = None,
    ) -> SandboxResult:
        """Run ``code``, call ``entry()``; a result always, never an exception for the program.

        Setting ``cancel`` (e.g. when the client went away) stops the run: its worker is
        killed and replaced, and the result says ``cancelled``.
        """
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
        with self._slots:
            worker = self._take()
            try:
                worker.send(payload)
                frame = worker.read(time.monotonic() + timeout_s + WORKER_MARGIN_S, cancel)
            except OSError:  # BrokenPipeError: the worker is gone
                frame = None
            if frame is None:  # cancelled, or the worker failed or hung: replace it
                self._release(None, broken=worker)
                cancelled = cancel is not None and cancel.is_set()
                return self._count(
                    SandboxResult(
                        error="the run was cancelled"
                        if cancelled
                        else "the sandbox worker stopped answering and was restarted",
                        error_type="cancelled" if cancelled else "sandbox",
                        duration_ms=(time.perf_counter() - started) * 1000,
                        isolation=self.isolation,
                    )
                )
            self._release(worker)
        reply = check_reply(frame, self.limits.max_output_chars + 1000)  # never trust a reply
        fields = SandboxResult.__dataclass_fields__
        result = SandboxResult(**{k: v for k, v in reply.items() if k in fields})
        result.isolation = self.isolation
        return self._count(result)

    def _count(self, result: SandboxResult) -> SandboxResult:
        with self._lock:
            self.runs += 1
            if result.error_type:
                self.limit_hits[result.error_type] = self.limit_hits.get(result.error_type, 0) + 1
        return result

    def worker_pids(self) -> list[int]:
        """Host pids of the running workers' outermost processes (for monitoring and tests)."""
        with self._lock:
            return [w.process.pid for w in [*self._idle, *self._busy] if w.alive()]

    def close(self) -> None:
        with self._lock:
            workers, self._idle, self._busy = [*self._idle, *self._busy], [], set()
        for worker in workers:
            worker.kill()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def describe(layers: Layers, worker: _Worker) -> str:
    """The layers in force, and the missing ones named as such (``weak: ...``)."""
    held, missing = [], []
    (held if layers.namespaces and worker.pidns else missing).append("namespaces")
    (held if layers.seccomp else missing).append("seccomp")
    landlock = f"landlock-v{worker.landlock_abi}" if worker.landlock_abi else "landlock"
    (held if worker.landlock_abi else missing).append(landlock)
    return "+".join(held) + (f"; weak: without {', '.join(missing)}" if missing else "")


def python_tool(sandbox: Sandbox | None = None) -> Any:
    """A ``python[...]`` tool for agents: a ``def solution():`` program, or one expression
    (``python[17 * 23 + 4]``); the result, or the sandbox's error, is the observation."""
    from agentkit.tools.registry import tool

    runner = sandbox or Sandbox()

    @tool(name="python")
    def run_python(code: str) -> str:
        """python[code]: run a def solution(): program or one expression in the sandbox."""
        program = code if "def solution" in code else f"def solution():\n    return ({code})\n"
        result = runner.run(program)
        if not result.ok:
            return f"Error ({result.error_type}): {result.error}"
        return json.dumps(result.value, ensure_ascii=False)

    return run_python
