"""The sandbox's warm worker: a pre-started interpreter that forks one fresh child per program.

Started by ``agentkit.tools.sandbox`` inside bubblewrap (see ``sandbox_launch.py``): an
unprivileged uid with no capabilities, in its own user, PID, IPC, network, mount, UTS and cgroup
namespaces, with a read-only view of the interpreter and a private, size-limited /tmp. Started as
``python -I -S sandbox_worker.py CONFIG`` with an empty environment; standard library only.
Requests and replies are length-prefixed JSON on stdin/stdout.

The child of each run adds, before it runs the program:
- setrlimit: CPU seconds, address space, file size, open files, no core dumps;
- Landlock (kernel ≥ 5.13): file access only beneath its scratch folder, and (ABI ≥ 6) no
  signals or abstract sockets outward;
- seccomp-bpf, an allowlist compiled on the host (``sandbox_policy.py``): everything it does not
  name fails with EPERM, and nothing the program does can lift the filter.

The worker never trusts the child: the reply is size- and depth-checked and rebuilt field by
field (a bad one is an error result for that run); waiting for the child has a deadline, after
which every process in the PID namespace but the worker and its init is killed.
"""

from __future__ import annotations

import base64
import builtins
import ctypes
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

PRELOAD = (
    "math cmath fractions decimal statistics itertools functools collections collections.abc "
    "datetime re string heapq bisect random _strptime json numbers operator copy"
).split()
SAFE_BUILTINS = (
    "abs all any ascii bin bool bytearray bytes callable chr complex dict divmod enumerate "
    "filter float format frozenset hash hex id int isinstance issubclass iter len list map max "
    "min next object oct ord pow print range repr reversed round set slice sorted str sum "
    "super tuple zip True False None Ellipsis NotImplemented ArithmeticError AssertionError "
    "AttributeError BaseException Exception IndexError KeyError LookupError MemoryError "
    "NameError OverflowError RecursionError RuntimeError StopIteration TypeError ValueError "
    "ZeroDivisionError __build_class__ property staticmethod classmethod"
).split()
REPLY_CAP = 4 << 20  # bytes of reply read from a child (or, on the host, from a worker)
MAX_DEPTH = 32  # nesting of a returned value
ESCAPED = 150  # exit status of a child that ended without reporting
ERROR_TYPES = frozenset(
    "syntax forbidden import_not_allowed no_entry timeout memory_limit output_limit "
    "recursion_limit exception killed crashed sandbox not_serializable bad_reply cancelled".split()
)


class OutputLimit(BaseException):
    """Raised in the program when it prints more than allowed (BaseException: hard to swallow)."""


class CappedWriter:
    def __init__(self, cap: int) -> None:
        self.cap, self.parts, self.size, self.truncated = cap, [], 0, False

    def write(self, text: str) -> int:
        if self.truncated:
            raise OutputLimit
        text = str(text)
        room = self.cap - self.size
        self.parts.append(text[:room])
        self.size += min(len(text), room)
        if len(text) > room:
            self.truncated = True
            raise OutputLimit
        return len(text)

    def flush(self) -> None:
        pass


def clean_text(text: str) -> str:
    """``text`` as valid UTF-8 (lone surrogates become U+FFFD)."""
    return text.encode("utf-8", "replace").decode("utf-8", "replace")


# --- Landlock (syscalls 444-446 on x86_64 and aarch64) ---------------------------------------

LANDLOCK_CREATE, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT = 444, 445, 446
FS_BITS_BY_ABI = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}  # how many access bits each ABI knows
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def landlock_abi() -> int:
    abi = _libc.syscall(LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, abi)


def landlock_confine(scratch: str, abi: int) -> None:
    """Allow file access beneath ``scratch`` only (no execute); ABI ≥ 6: no signals outward."""
    fs_all = (1 << FS_BITS_BY_ABI.get(abi, 16)) - 1
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    if abi >= 6:
        attr = struct.pack("QQQ", fs_all, 0, scoped)
    else:
        attr = struct.pack("Q", fs_all)
    buf = ctypes.create_string_buffer(attr)
    ruleset = _libc.syscall(LANDLOCK_CREATE, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    folder = os.open(scratch, os.O_PATH | os.O_DIRECTORY)
    rule = ctypes.create_string_buffer(struct.pack("=Qi", fs_all & ~1, folder))  # ~EXECUTE
    if _libc.syscall(LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), rule, 0) < 0:
        raise OSError(ctypes.get_errno(), "landlock_add_rule")
    os.close(folder)
    if _libc.syscall(LANDLOCK_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)


_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(bpf: bytes) -> None:
    """Install the host-compiled BPF filter on this process (irrevocably)."""
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(len(bpf) // 8, ctypes.cast(program, ctypes.c_void_p))
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


# --- the reply: never trusted ------------------------------------------------------------------


def depth_ok(value: object, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests at most ``limit`` deep (iteratively: no recursion to exhaust)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth >= limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def clean_value(value: object) -> object:
    """JSON data with every string (keys included) valid UTF-8; ``value`` must be depth-checked."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_value(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_value(v) for k, v in value.items()}
    return value


def check_reply(data: bytes | bytearray, max_value_chars: int) -> dict:
    """The reply of a child (or of a worker) as a clean result dict; a bad one as an error."""

    def bad(why: str) -> dict:
        return {
            "value": None,
            "stdout": "",
            "error": f"the sandbox got a malformed result: {why}",
            "error_type": "bad_reply",
        }

    if len(data) > REPLY_CAP:
        return bad(f"larger than {REPLY_CAP} bytes")
    try:
        reply = json.loads(bytes(data).decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return bad("not JSON")
    if not isinstance(reply, dict):
        return bad("not an object")
    if not depth_ok(reply, MAX_DEPTH + 2):
        return bad(f"nested deeper than {MAX_DEPTH}")
    clean: dict = {"value": clean_value(reply.get("value"))}
    if len(json.dumps(clean["value"], ensure_ascii=False)) > max_value_chars:
        return bad(f"the value is larger than {max_value_chars} characters as JSON")
    for key in ("stdout", "error", "isolation"):
        text = reply.get(key)
        if text is not None and not isinstance(text, str):
            return bad(f"{key} is not a string")
        clean[key] = clean_text(text) if text is not None else ("" if key == "stdout" else None)
    kind = reply.get("error_type")
    clean["error_type"] = None if kind is None else (kind if kind in ERROR_TYPES else "bad_reply")
    if clean["error_type"] and not clean["error"]:
        clean["error"] = "the program failed"
    for key in ("stdout_truncated", "converted"):
        clean[key] = reply.get(key) is True
    duration = reply.get("duration_ms")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool):
        clean["duration_ms"] = float(duration) if math.isfinite(duration) else 0.0
    return clean


# --- the child ---------------------------------------------------------------------------------


def json_safe(value: object, depth: int = 0) -> tuple[object, bool]:
    """``value`` as JSON data, and whether anything had to be converted."""
    if depth > MAX_DEPTH - 2:
        return repr(value)[:200], True
    if value is None or isinstance(value, bool):
        return value, False
    if isinstance(value, str):
        safe = clean_text(value)
        return safe, safe != value
    if isinstance(value, int):
        return (value, False) if abs(value) < 2**63 else (str(value), True)
    if isinstance(value, float):
        return (value, False) if math.isfinite(value) else (str(value), True)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        pairs = [json_safe(v, depth + 1) for v in items]
        return [v for v, _ in pairs], not isinstance(value, list) or any(c for _, c in pairs)
    if isinstance(value, dict):
        out, changed = {}, False
        for k, v in value.items():
            safe, c = json_safe(v, depth + 1)
            out[clean_text(k) if isinstance(k, str) else str(k)] = safe
            changed = changed or c or not isinstance(k, str)
        return out, changed
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return json_safe(item(), depth + 1)[0], True
        except Exception:
            pass
    for kind in (int, float):
        try:
            number = kind(value)  # Fraction, Decimal
            if number == value:
                return json_safe(number, depth + 1)[0], True
        except Exception:
            pass
    try:
        return json_safe(float(value), depth + 1)[0], True
    except Exception:
        return clean_text(repr(value)[:1000]), True


def program_line(tb: object, filename: str) -> int | None:
    line = None
    for frame, lineno in traceback.walk_tb(tb):  # type: ignore[arg-type]
        if frame.f_code.co_filename == filename:
            line = lineno
    return line


def confine(request: dict, scratch: str, config: dict) -> None:
    """Limits, Landlock and seccomp on this process, in that order (seccomp last: it forbids
    the calls that set up the others)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.chdir(scratch)
    memory = int(request["base_bytes"]) + (int(request["memory_mb"]) << 20)
    cpu = max(1, math.ceil(float(request["timeout_s"])))
    for limit, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (memory, memory)),
        (resource.RLIMIT_FSIZE, (8 << 20, 8 << 20)),
        (resource.RLIMIT_NOFILE, (64, 64)),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(limit, value)
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # needed by Landlock and seccomp
    if config["landlock_abi"]:
        landlock_confine(scratch, config["landlock_abi"])
    if config["bpf"]:
        load_seccomp(config["bpf"])
    os.environ.clear()


def run_child(request: dict, scratch: str, result_fd: int, config: dict) -> None:
    """Confine this process, run the program, write the result JSON to ``result_fd``, exit."""
    report: dict = {"value": None, "error": None, "error_type": None}
    out = CappedWriter(int(request["max_output"]))
    try:
        confine(request, scratch, config)
    except BaseException as error:  # refuse to run unconfined
        report.update(error=f"sandbox setup failed: {error}", error_type="sandbox")
        finish(report, out, result_fd, int(request["max_output"]))
    allowed = set(request["allowed_imports"])
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
        # CPython imports some helpers lazily (datetime.strptime -> _strptime): private modules
        # the worker preloaded may load; the pre-check refuses `import _x` in programs anyway.
        preloaded_private = name.startswith("_") and name in sys.modules
        if level or (name.split(".")[0] not in allowed and not preloaded_private):
            raise ImportError(f"import of {name!r} is not allowed in the sandbox")
        return real_import(name, globals, locals, fromlist, level)

    safe = {n: getattr(builtins, n) for n in SAFE_BUILTINS if hasattr(builtins, n)}
    safe["__import__"] = guarded_import
    if not request.get("python_guards", True):  # tests prove the OS layers alone hold
        safe = builtins.__dict__
    namespace = {"__name__": "__sandbox__", "__builtins__": safe}
    sys.stdout = sys.stderr = out
    sys.setrecursionlimit(2000)
    filename = "<program>"
    try:
        code = compile(request["code"], filename, "exec")
        exec(code, namespace)  # noqa: S102  (this is the confined child, never the host)
        entry = namespace.get(request["entry"])
        if not callable(entry):
            report.update(
                error=f"the program defines no function {request['entry']}()", error_type="no_entry"
            )
        else:
            value, converted = json_safe(entry())
            report["value"] = value
            if converted:
                report["converted"] = True
    except OutputLimit:
        report.update(
            error="the program printed more than the output limit", error_type="output_limit"
        )
    except MemoryError:
        report.update(error="the program ran out of its memory limit", error_type="memory_limit")
    except RecursionError:
        report.update(error="maximum recursion depth exceeded", error_type="recursion_limit")
    except ImportError as error:
        report.update(error=str(error), error_type="import_not_allowed")
    except SyntaxError as error:
        report.update(error=f"syntax error: {error.msg} (line {error.lineno})", error_type="syntax")
    except BaseException as error:
        line = program_line(error.__traceback__, filename)
        where = f" (line {line})" if line else ""
        report.update(
            error=f"{type(error).__name__}: {error}{where}"[:2000], error_type="exception"
        )
    finish(report, out, result_fd, int(request["max_output"]))


def finish(report: dict, out: CappedWriter, result_fd: int, max_output: int) -> None:
    """Write the report (value capped by its size as JSON) to ``result_fd`` and exit at once."""
    report["stdout"] = clean_text("".join(out.parts))
    report["stdout_truncated"] = out.truncated
    report["error"] = clean_text(report["error"]) if report["error"] else report["error"]
    try:
        size = len(json.dumps(report["value"], ensure_ascii=False))
        if size > max_output:
            report.update(
                value=None,
                error=f"the returned value is {size} characters as JSON; the limit is {max_output}",
                error_type="output_limit",
            )
        data = json.dumps(report, ensure_ascii=False).encode()
    except (TypeError, ValueError, RecursionError):
        data = json.dumps(
            {
                **report,
                "value": None,
                "error": "result not serialisable",
                "error_type": "not_serializable",
            }
        ).encode()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(result_fd, view) :]
    finally:
        os._exit(0)  # no interpreter shutdown: no finalizers, no atexit


# --- the worker loop ---------------------------------------------------------------------------


def mapped_bytes() -> int:
    """Address space this interpreter maps already (the memory limit comes on top)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 1 << 30


def kill_leftovers(pid: int, config: dict) -> None:
    """SIGKILL the child and anything it left; in our own PID namespace that is everything but
    this worker and the namespace's init."""
    try:
        if config["pidns"]:
            os.kill(-1, signal.SIGKILL)
        else:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def collect(read_fd: int, pid: int, deadline: float) -> tuple[bytearray, bool]:
    """The child's reply until it has both closed the pipe and exited, or the deadline passed."""
    data, timed_out = bytearray(), False
    pidfd = os.pidfd_open(pid)
    waiting = [read_fd, pidfd]
    try:
        while waiting:
            left = deadline - time.perf_counter()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select(waiting, [], [], left)
            if read_fd in ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    waiting.remove(read_fd)
                elif len(data) <= REPLY_CAP:
                    data += chunk  # past the cap: drained, dropped, judged by check_reply
            if pidfd in ready:
                waiting.remove(pidfd)
    finally:
        os.close(pidfd)
    return data, timed_out


def run_one(request: dict, config: dict) -> dict:
    started = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="agentkit-sandbox-")
    request["base_bytes"] = mapped_bytes()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.setpgid(0, 0)
            os.close(read_fd)
            run_child(request, scratch, write_fd, config)
        finally:
            os._exit(ESCAPED)
    os.close(write_fd)
    try:
        data, timed_out = collect(read_fd, pid, started + float(request["timeout_s"]))
    finally:
        os.close(read_fd)
        kill_leftovers(pid, config)
        _, status = os.waitpid(pid, 0)
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if timed_out:
        return {
            "value": None,
            "stdout": "",
            "error": f"the program ran longer than {request['timeout_s']} s and was killed",
            "error_type": "timeout",
            "duration_ms": elapsed_ms,
        }
    if data:
        result = check_reply(data, int(request["max_output"]))
        result["duration_ms"] = elapsed_ms
        return result
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        kind = {signal.SIGXCPU: "timeout", signal.SIGKILL: "killed", signal.SIGSEGV: "crashed"}
        message = {
            signal.SIGXCPU: "the program used up its CPU-time limit",
            signal.SIGSEGV: "the program crashed (stack overflow or bad memory access)",
        }
        return {
            "value": None,
            "stdout": "",
            "duration_ms": elapsed_ms,
            "error": message.get(sig, f"the program was killed by signal {sig}"),
            "error_type": kind.get(sig, "killed"),
        }
    return {
        "value": None,
        "stdout": "",
        "duration_ms": elapsed_ms,
        "error": f"the program ended without a result (exit status {os.WEXITSTATUS(status)})",
        "error_type": "crashed",
    }


def read_message(stream) -> dict | None:
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    return json.loads(stream.read(size))


def write_message(stream, message: dict) -> None:
    data = json.dumps(message, ensure_ascii=True).encode()
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def main() -> None:
    options = json.loads(sys.argv[1])
    sys.path.extend(options.get("sys_path", ()))
    for name in PRELOAD:
        __import__(name)
    abi = landlock_abi() if options["landlock"] else 0
    config = {
        "landlock_abi": abi,
        "bpf": base64.b64decode(options["bpf"]) if options.get("bpf") else b"",
        "pidns": bool(options.get("pidns")) and os.getppid() == 1,  # our init is pid 1
    }
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # the host stops reading stderr once we are up
    sys.stdout = sys.stderr = open(devnull, "w", closefd=False)  # stray prints: not the protocol
    hello = {"ready": True, "landlock_abi": abi, "pidns": config["pidns"], "uid": os.getuid()}
    write_message(stdout, hello)
    while (request := read_message(stdin)) is not None:
        for name in request.get("preload", ()):
            try:
                __import__(name)  # opt-in modules (numpy, sympy) load here, before the fork
            except ImportError:
                pass
        write_message(stdout, run_one(request, config))


if __name__ == "__main__":
    main()
