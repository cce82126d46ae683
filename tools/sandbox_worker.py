"""The sandbox's warm worker: a pre-started interpreter that forks one fresh child per program.

Started by ``agentkit.tools.sandbox.Sandbox`` as ``python -I sandbox_worker.py`` with an empty
environment (no host secrets). Stdlib and pyseccomp only: it never imports agentkit. Requests and
replies are length-prefixed JSON on stdin/stdout.

Why these layers (the guarantee must hold even when the Python-level checks are bypassed):
- fork per program: a child starts from the warm, already-imported interpreter in ~1 ms and
  dies afterwards, so one program never sees another's state.
- setrlimit: CPU seconds, address space, file size, open files, no core dumps.
- Landlock (kernel ≥ 5.13; ABI 7 here): the child may touch files only inside its scratch
  directory, and (ABI ≥ 6) may not signal processes outside itself. Unprivileged, per-process,
  no mount namespaces needed. Without Landlock every open() is refused by seccomp instead.
- seccomp-bpf (libseccomp through pyseccomp): no new processes or threads (fork, vfork, clone,
  clone3), no exec, no sockets, no signals to others, no raising rlimits (we run as root here,
  and root may raise hard limits), no ptrace, namespaces, io_uring, bpf or keyrings. A denied
  call fails with EPERM; nothing the program does can lift the filter.
- A wall-clock deadline here, then SIGKILL of the child's process group; the host adds its own
  deadline on this worker and restarts it if it ever stops answering.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
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
DENIED_SYSCALLS = (
    "fork vfork clone execve execveat socket socketpair connect bind listen accept accept4 "
    "kill tkill tgkill rt_sigqueueinfo rt_tgsigqueueinfo pidfd_open pidfd_send_signal "
    "pidfd_getfd ptrace process_vm_readv process_vm_writev setrlimit prlimit64 unshare setns "
    "mount umount2 pivot_root chroot keyctl add_key request_key bpf perf_event_open "
    "userfaultfd io_uring_setup io_uring_enter io_uring_register open_by_handle_at "
    "name_to_handle_at personality seccomp setpgid setsid kcmp mknod mknodat"
).split()
OPEN_SYSCALLS = ("open", "openat", "openat2", "creat")
SAFE_BUILTINS = (
    "abs all any ascii bin bool bytearray bytes callable chr complex dict divmod enumerate "
    "filter float format frozenset hash hex id int isinstance issubclass iter len list map max "
    "min next object oct ord pow print range repr reversed round set slice sorted str sum "
    "super tuple zip True False None Ellipsis NotImplemented ArithmeticError AssertionError "
    "AttributeError BaseException Exception IndexError KeyError LookupError MemoryError "
    "NameError OverflowError RecursionError RuntimeError StopIteration TypeError ValueError "
    "ZeroDivisionError __build_class__ property staticmethod classmethod"
).split()
RESULT_CAP = 1 << 20  # bytes of JSON a program may return
ESCAPED = 150  # exit status of a child that ended without reporting


class OutputLimit(BaseException):
    """Raised in the program when it prints more than allowed (BaseException: hard to swallow)."""


class CappedWriter:
    def __init__(self, cap: int) -> None:
        self.cap, self.parts, self.size, self.truncated = cap, [], 0, False

    def write(self, text: str) -> int:
        if self.truncated:
            raise OutputLimit
        room = self.cap - self.size
        self.parts.append(text[:room])
        self.size += min(len(text), room)
        if len(text) > room:
            self.truncated = True
            raise OutputLimit
        return len(text)

    def flush(self) -> None:
        pass


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


def build_seccomp(deny_open: bool):
    import pyseccomp as seccomp

    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in [*DENIED_SYSCALLS, *(OPEN_SYSCALLS if deny_open else ())]:
        try:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            pass  # a syscall this architecture does not have (e.g. open on aarch64)
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # glibc then tries clone: EPERM
    return rules


# --- the child ---------------------------------------------------------------------------------


def json_safe(value: object, depth: int = 0) -> tuple[object, bool]:
    """``value`` as JSON data, and whether anything had to be converted."""
    if depth > 50:
        return repr(value)[:200], True
    if value is None or isinstance(value, (bool, str)):
        return value, False
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
            out[k if isinstance(k, str) else str(k)] = safe
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
        return repr(value)[:1000], True


def program_line(tb: object, filename: str) -> int | None:
    line = None
    for frame, lineno in traceback.walk_tb(tb):  # type: ignore[arg-type]
        if frame.f_code.co_filename == filename:
            line = lineno
    return line


def run_child(request: dict, scratch: str, result_fd: int, rules, landlock: int) -> None:
    """Confine this process, run the program, write the result JSON to ``result_fd``, exit."""
    report: dict = {"value": None, "error": None, "error_type": None}
    out = CappedWriter(int(request["max_output"]))
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.chdir(scratch)
        # the limit is on top of what the warm interpreter has mapped already
        mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        memory = mapped + (int(request["memory_mb"]) << 20)
        cpu = max(1, math.ceil(float(request["timeout_s"])))
        for limit, value in (
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_AS, (memory, memory)),
            (resource.RLIMIT_FSIZE, (8 << 20, 8 << 20)),
            (resource.RLIMIT_NOFILE, (64, 64)),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(limit, value)
        _libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: needed by Landlock and seccomp
        if landlock:
            landlock_confine(scratch, landlock)
        rules.load()
        os.environ.clear()
    except BaseException as error:  # refuse to run unconfined
        report.update(error=f"sandbox setup failed: {error}", error_type="sandbox")
        finish(report, out, result_fd)
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
    finish(report, out, result_fd)


def finish(report: dict, out: CappedWriter, result_fd: int) -> None:
    report["stdout"] = "".join(out.parts)
    report["stdout_truncated"] = out.truncated
    try:
        data = json.dumps(report, ensure_ascii=False).encode()
    except (TypeError, ValueError):
        data = json.dumps(
            {
                **report,
                "value": None,
                "error": "result not serialisable",
                "error_type": "not_serializable",
            }
        ).encode()
    if len(data) > RESULT_CAP:
        data = json.dumps(
            {
                "value": None,
                "stdout": report["stdout"][:1000],
                "error": f"the result is larger than {RESULT_CAP} bytes",
                "error_type": "output_limit",
            }
        ).encode()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(result_fd, view) :]
    finally:
        os._exit(0)  # no interpreter shutdown: no finalizers, no atexit


# --- the worker loop ---------------------------------------------------------------------------


def run_one(request: dict, rules, landlock: int) -> dict:
    started = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="agentkit-sandbox-")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.setpgid(0, 0)
            os.close(read_fd)
            run_child(request, scratch, write_fd, rules, landlock)
        finally:
            os._exit(ESCAPED)
    os.close(write_fd)
    deadline = started + float(request["timeout_s"])
    data, timed_out = bytearray(), False
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_fd], [], [], left)
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk[: RESULT_CAP + 65536 - len(data)]
    os.close(read_fd)
    if timed_out:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
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
    try:
        result = json.loads(data)
        result["duration_ms"] = elapsed_ms
        return result
    except ValueError:
        pass
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
    data = json.dumps(message, ensure_ascii=False).encode()
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def main() -> None:
    for name in PRELOAD:
        __import__(name)
    landlock = 0 if "--no-landlock" in sys.argv else landlock_abi()
    rules = build_seccomp(deny_open=not landlock)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    write_message(stdout, {"ready": True, "landlock_abi": landlock, "pid": os.getpid()})
    while (request := read_message(stdin)) is not None:
        for name in request.get("preload", ()):
            try:
                __import__(name)  # opt-in modules (numpy, sympy) load here, before the fork
            except ImportError:
                pass
        write_message(stdout, run_one(request, rules, landlock))


if __name__ == "__main__":
    main()
