"""The OS boundary of the sandbox, attack class by attack class (issue 11's red-team round).

Every program here runs with the Python-level layers off (no pre-check, full builtins), so only
the operating system stands between it and the host: the unprivileged worker in its own
namespaces, Landlock, and the seccomp allowlist. ``ctypes`` is importable there because the
worker preloads it (for Landlock), so the programs make raw system calls.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from agentkit.errors import SandboxError
from agentkit.tools import sandbox_launch
from agentkit.tools.sandbox import Sandbox

TIMEOUT_S = 1.5
SYSCALL = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(number, *args):
    ctypes.set_errno(0)
    result = libc.syscall(number, *args)
    return [result, ctypes.get_errno()]
"""


def descendants(pid: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except OSError:
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def running(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
        except OSError:
            pass
    return alive


def trees(box: Sandbox) -> set[int]:
    return {p for pid in box.worker_pids() for p in {pid} | descendants(pid)}


@pytest.fixture(scope="module")
def box():
    with Sandbox(
        timeout_s=TIMEOUT_S, memory_mb=128, precheck=False, python_guards=False, workers=1
    ) as sandbox:
        sandbox.start()
        yield sandbox


def run(box: Sandbox, body: str, **kwargs) -> object:
    result = box.run(SYSCALL + "def solution():\n" + body, **kwargs)
    assert result.ok, result
    return result.value


def test_every_result_says_how_it_was_confined(box) -> None:
    result = box.run("def solution():\n    return 1")
    assert result.isolation.startswith("namespaces+seccomp+landlock"), result.isolation
    assert "weak" not in result.isolation


def test_the_worker_is_unprivileged_on_the_host(box) -> None:
    for pid in box.worker_pids():
        (inner,) = [
            p
            for p in descendants(pid)
            if b"bwrap" not in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]
        ]
        status = Path(f"/proc/{inner}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        caps = {
            line.split(":")[0]: line.split()[1]
            for line in status.splitlines()
            if line.startswith("Cap")
        }
        assert set(uids) == {"65534"}, status
        assert int(caps["CapBnd"], 16) == 0 and int(caps["CapEff"], 16) == 0
        assert int(caps["CapAmb"], 16) == 0
        assert os.readlink(f"/proc/{inner}/ns/user") != os.readlink("/proc/self/ns/user")
        for ns in ("pid", "ipc", "net", "mnt", "uts"):
            assert os.readlink(f"/proc/{inner}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")


@pytest.mark.parametrize(
    ("name", "body"),
    [
        # reboot with a wrong magic number: EINVAL if the call got through, EPERM if refused
        ("reboot", "    return call(169, 0, 0, 0, None)"),
        (
            "sethostname",
            "    name = os.uname().nodename.encode()\n    return call(170, name, len(name))",
        ),
        ("syslog", "    return call(103, 10, None, 0)"),  # SYSLOG_ACTION_SIZE_BUFFER
        ("fanotify_init", "    return call(300, 0, 0)"),
        ("inotify_init1", "    return call(294, 0)"),
        ("shmget", "    return call(29, 0, 4096, 0o1600)"),  # IPC_PRIVATE, IPC_CREAT|0600
        ("msgget", "    return call(68, 0, 0o1600)"),
        ("semget", "    return call(64, 0, 1, 0o1600)"),
        (
            "settimeofday",
            "    import ctypes as c\n    tv = (c.c_long * 2)(0, 0)\n    return call(164, None, tv)",
        ),  # a timezone only
        ("unshare", "    return call(272, 0x10000000)"),  # CLONE_NEWUSER
        ("memfd_create", "    return call(319, b'x', 0)"),
        ("setpriority", "    return call(141, 0, 0, 19)"),
        (
            "sched_setscheduler",
            "    p = ctypes.c_int(0)\n    return call(144, 0, 5, ctypes.byref(p))",
        ),
    ],
)
def test_privileged_and_unlisted_calls_fail_with_eperm(box, name: str, body: str) -> None:
    result, err = run(box, body)
    assert (result, err) == (-1, errno.EPERM), f"{name} returned {result}, errno {err}"


def test_file_metadata_outside_the_scratch_folder_cannot_change(box, tmp_path: Path) -> None:
    target = Path("/tmp") / f"agentkit-metadata-{os.getpid()}"
    target.write_text("x")
    target.chmod(0o600)
    before = target.stat()
    try:
        outcome = run(
            box,
            f"""
    target = {str(target)!r}
    tried = {{}}
    for name, action in (("chmod", lambda: os.chmod(target, 0o777)),
                         ("chown", lambda: os.chown(target, 0, 0)),
                         ("utime", lambda: os.utime(target, (0, 0))),
                         ("setxattr", lambda: os.setxattr(target, "user.x", b"1"))):
        try:
            action()
            tried[name] = "done"
        except OSError as error:
            tried[name] = error.errno
    tried["exists"] = os.path.exists(target)
    return tried
""",
        )
        after = target.stat()
        assert (stat.S_IMODE(after.st_mode), after.st_mtime) == (0o600, before.st_mtime)
        assert "done" not in outcome.values(), outcome
        assert outcome["exists"] is False, "the host's /tmp is visible in the sandbox"
    finally:
        target.unlink()


def test_host_processes_and_files_are_not_visible(box) -> None:
    ids = run(
        box,
        "    return [os.getpid(), os.getppid(), os.uname().nodename,"
        " os.path.exists('/etc/passwd'), os.path.exists('/home')]",
    )
    assert ids[1] == 2, f"host pids visible: {ids}"  # the worker is pid 2 of its namespace
    assert ids[2] == "sandbox"
    assert ids[3:] == [False, False]


def test_sysv_ipc_leaves_nothing_behind(box) -> None:
    def segments() -> list[str]:
        return Path("/proc/sysvipc/shm").read_text().splitlines()[1:]

    before = segments()
    run(box, "    return call(29, 0, 1 << 20, 0o1600)")
    assert segments() == before


def test_a_program_cannot_slow_the_worker(box) -> None:
    before = {
        pid: os.getpriority(os.PRIO_PROCESS, p)
        for pid in box.worker_pids()
        for p in descendants(pid)
    }
    run(box, "    return [call(141, 0, 0, 19), call(141, 0, os.getppid(), 19)]")
    after = {
        pid: os.getpriority(os.PRIO_PROCESS, p)
        for pid in box.worker_pids()
        for p in descendants(pid)
    }
    assert after == before
    assert box.run("def solution():\n    return 6 * 7").value == 42


def test_a_child_that_closes_its_pipe_and_sleeps_is_killed_at_its_deadline(box) -> None:
    tree = trees(box)
    started = time.monotonic()
    result = box.run(
        "import os, time\ndef solution():\n    os.closerange(3, 64)\n    time.sleep(60)\n"
    )
    elapsed = time.monotonic() - started
    assert result.error_type == "timeout", result
    assert elapsed < TIMEOUT_S + 1.0, f"the run took {elapsed:.1f} s"
    assert trees(box) == tree, "a process outlived its run, or the worker was replaced"


FORGED = {
    "deep": "'[' * 700 + ']' * 700",
    "not-an-object": "'[1, 2, 3]'",
    "lone-surrogate": "json.dumps({'value': '\\ud800', 'stdout': '\\udfff'})",
    "bad-types": "json.dumps({'value': 1, 'stdout': 7, 'error_type': 'root'})",
    "deep-value": "json.dumps({'value': eval('[' * 200 + ']' * 200)})",
    "huge-value": "json.dumps({'value': ['x' * 1000] * 300})",
    "not-json": "'\\x00\\xff{'",
}


@pytest.mark.parametrize("kind", sorted(FORGED))
def test_a_forged_reply_is_an_error_result_never_a_crash(box, kind: str) -> None:
    tree = trees(box)
    result = box.run(f"""import json, os
def solution():
    data = ({FORGED[kind]}).encode('utf-8', 'surrogatepass')
    for fd in range(3, 64):
        try:
            os.write(fd, data)
        except OSError:
            pass
    os._exit(0)
""")
    shown = json.dumps(result.to_dict(), ensure_ascii=False).encode("utf-8")  # valid UTF-8
    assert len(shown) < 80_000
    assert result.error_type in {"bad_reply", None}, result
    assert trees(box) == tree, "the worker died"
    assert box.run("def solution():\n    return 6 * 7").value == 42


def test_printing_a_lone_surrogate_is_replaced(box) -> None:
    result = box.run("def solution():\n    print('\\ud800 ok')\n    return '\\udfff'")
    assert result.ok, result
    assert "ok" in result.stdout and "\ud800" not in result.stdout
    json.dumps(result.to_dict(), ensure_ascii=False).encode("utf-8")


def test_values_are_capped_by_their_size_as_json() -> None:
    with Sandbox(max_output_chars=10_000, workers=1) as box:
        result = box.run("def solution():\n    return [[[i, i, i] for i in range(2000)]]")
    assert result.error_type == "output_limit", result
    assert "limit is 10000" in (result.error or "")


def test_one_hostile_program_does_not_hold_up_the_others() -> None:
    with Sandbox(timeout_s=3, workers=2) as box:
        box.start()
        hostile_done = threading.Event()

        def hostile() -> None:
            box.run("import time\ndef solution():\n    time.sleep(60)", allowed_imports=["time"])
            hostile_done.set()

        thread = threading.Thread(target=hostile)
        thread.start()
        try:
            quick = [box.run("def solution():\n    return 1").value for _ in range(3)]
            assert quick == [1, 1, 1]
            assert not hostile_done.is_set(), "the quick runs waited for the hostile one"
        finally:
            thread.join()


def test_cancelling_a_run_kills_its_worker_tree() -> None:
    with Sandbox(timeout_s=30, workers=1) as box:
        box.start()
        before = trees(box)
        cancel = threading.Event()
        started = threading.Timer(0.3, cancel.set)
        started.start()
        result = box.run(
            "import time\ndef solution():\n    time.sleep(60)",
            allowed_imports=["time"],
            cancel=cancel,
        )
        assert result.error_type == "cancelled", result
        deadline = time.monotonic() + 5  # the namespace's processes die with its init
        while running(before) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not running(before), "the cancelled worker's processes are still running"
        assert box.run("def solution():\n    return 2").value == 2


def test_without_bubblewrap_it_refuses_unless_weak_mode_is_chosen(monkeypatch) -> None:
    real_which = sandbox_launch.shutil.which
    monkeypatch.setattr(
        sandbox_launch.shutil, "which", lambda name: None if name == "bwrap" else real_which(name)
    )
    with pytest.raises(SandboxError, match="bubblewrap is not installed.*ALLOW_WEAK"):
        Sandbox(workers=1, allow_weak=False).run("def solution():\n    return 1")
    with Sandbox(workers=1, allow_weak=True) as weak:
        result = weak.run("def solution():\n    return 1")
    assert result.value == 1
    assert "weak: without namespaces" in result.isolation


def test_views_below_tmp_are_bound_after_the_private_tmp_is_mounted(monkeypatch) -> None:
    # a checkout under /tmp: its site-packages must not vanish under the sandbox's own /tmp
    monkeypatch.setattr(sandbox_launch, "site_dirs", lambda: ["/tmp/checkout/site-packages"])
    command = sandbox_launch.worker_command(sandbox_launch.Layers(), 65534)
    stages = [i for i, arg in enumerate(command) if arg == "bwrap"]
    for start, end in zip(stages, [*stages[1:], len(command)]):
        stage = command[start:end]
        view = stage.index("/tmp/checkout/site-packages")
        assert stage.index("--tmpfs") < view, stage


def test_a_worker_that_died_while_idle_is_replaced() -> None:
    import signal

    with Sandbox(workers=1) as box:
        box.start()
        open_fds = len(os.listdir("/proc/self/fd"))
        (pid,) = box.worker_pids()
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while running({pid}) and time.monotonic() < deadline:  # until it is dead (a zombie)
            time.sleep(0.01)
        assert box.run("def solution():\n    return 3").value == 3
        assert box.worker_pids() != [pid]
        assert len(os.listdir("/proc/self/fd")) == open_fds  # the old pipes are not kept open
