"""What the sandbox's child may do: the seccomp allowlist, compiled to BPF on the host.

An allowlist, not a denylist: the child may compute, allocate memory, read and write the file
descriptors it already holds, touch files (Landlock confines those to its scratch folder), read
clocks and randomness, and exit. Every other system call fails with EPERM — privileged calls
(``reboot``, ``settimeofday``, ``sethostname``, ``syslog``), file metadata (``chmod``, ``chown``,
``utime``, ``setxattr``: Landlock does not govern them), ``fanotify``/``inotify``, SysV IPC,
priorities and scheduling, new processes and threads, exec, sockets, signals, ``ptrace``,
namespaces, ``io_uring``, ``bpf``, keyrings, and whatever a future kernel adds.

The filter is compiled here with libseccomp (pyseccomp) and handed to the worker as raw BPF, so
the worker inside the namespaces needs nothing beyond the standard library.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

# The calls CPython (and numpy/sympy, preloaded before the fork) make while running a program.
ALLOWED_SYSCALLS = (
    # memory
    "brk mmap munmap mremap mprotect madvise mincore "
    # descriptors the child holds (the result pipe, /dev/null, files in its scratch folder)
    "read write readv writev pread64 pwrite64 lseek close close_range dup dup2 dup3 fcntl "
    "fstat newfstatat stat lstat statx fstatfs statfs getdents64 getcwd chdir fchdir "
    "ftruncate fsync fdatasync pipe2 poll ppoll select pselect6 "
    # files: allowed by seccomp, confined to the scratch folder by Landlock
    "openat open creat mkdir mkdirat rmdir unlink unlinkat rename renameat renameat2 "
    "readlink readlinkat access faccessat faccessat2 "
    # time, identity, randomness, limits (read-only: prlimit64 is checked below)
    "clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday time getrandom "
    "getpid getppid gettid getuid geteuid getgid getegid getgroups getresuid getresgid "
    "getrlimit getrusage times sysinfo uname sched_yield sched_getaffinity "
    # signals to itself, threads' bookkeeping, exit
    "rt_sigaction rt_sigprocmask rt_sigreturn sigaltstack futex set_robust_list "
    "get_robust_list rseq arch_prctl set_tid_address exit exit_group"
).split()
# Without Landlock (an explicit, reported opt-out) the child may not open files at all.
OPEN_SYSCALLS = frozenset(
    {
        "open",
        "openat",
        "creat",
        "mkdir",
        "mkdirat",
        "rename",
        "renameat",
        "renameat2",
        "unlink",
        "unlinkat",
        "rmdir",
    }
)


@functools.lru_cache(maxsize=4)
def seccomp_bpf(allow_files: bool) -> bytes:
    """The child's filter as a BPF program (``struct sock_filter`` array), for this machine."""
    import pyseccomp as seccomp  # the import error is reported by the caller

    rules = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    for name in ALLOWED_SYSCALLS:
        if name in OPEN_SYSCALLS and not allow_files:
            continue
        try:
            rules.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            pass  # a call this architecture does not have (e.g. open on aarch64)
    # prlimit64 only to read a limit (new_limit == NULL): raising or lowering is refused
    rules.add_rule(seccomp.ALLOW, "prlimit64", seccomp.Arg(2, seccomp.EQ, 0))
    # clone3 → ENOSYS so glibc falls back to clone, which then fails with EPERM
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.flush()
        os.lseek(out.fileno(), 0, os.SEEK_SET)
        return out.read()
