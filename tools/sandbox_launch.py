"""How the sandbox worker is started: inside bubblewrap, unprivileged, in its own namespaces.

Why bubblewrap: it is the small, setuid-free, well-audited sandbox under Flatpak, it builds a
root filesystem from explicit read-only binds (nothing of the host is there unless named), and
it sets up user, PID, IPC, network, mount, UTS and cgroup namespaces, drops every capability
(bounding and ambient sets included), forbids nested user namespaces and dies with its parent.
Doing the same with ``unshare``/``clone`` by hand would re-implement it.

The worker runs as uid 65534 (``AGENTKIT_SANDBOX_UID``) *outside* too, not only inside its user
namespace: when agentkit runs as root, a first bubblewrap (still root, mount namespace only)
builds the read-only view — the interpreter may live under /root, which uid 65534 cannot
traverse — then ``setpriv`` drops to the sandbox uid with no capabilities and
``no_new_privs``, and the second bubblewrap makes the namespaces. So a file the sandbox could
reach would be checked against an unprivileged uid on the host, never against root.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("sandbox_worker.py")
WORKER_INSIDE = "/sandbox/worker.py"
TMP_BYTES = 64 << 20  # the private /tmp (scratch folders) of one worker
ENV = {
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "PATH": "/usr/bin:/bin",
}


@dataclass(frozen=True)
class Layers:
    """The confinement asked for; each ``False`` is a reported weakening."""

    namespaces: bool = True
    seccomp: bool = True
    landlock: bool = True


def missing_tools(layers: Layers) -> list[tuple[str, str]]:
    """What this machine lacks for ``layers``: (the ``Layers`` field it takes away, what is
    missing and how to get it)."""
    missing = []
    if layers.namespaces and shutil.which("bwrap") is None:
        missing.append(
            ("namespaces", "bubblewrap is not installed (Debian/Ubuntu: apt install bubblewrap)")
        )
    if layers.namespaces and os.geteuid() == 0 and shutil.which("setpriv") is None:
        missing.append(
            ("namespaces", "setpriv is not installed (Debian/Ubuntu: apt install util-linux)")
        )
    if layers.seccomp:
        try:
            from agentkit.tools.sandbox_policy import seccomp_bpf

            seccomp_bpf(layers.landlock)
        except Exception as error:  # ImportError, OSError from libseccomp
            missing.append(
                (
                    "seccomp",
                    f"seccomp is unavailable ({error}; pip install pyseccomp, and "
                    "Debian/Ubuntu: apt install libseccomp2)",
                )
            )
    return missing


def worker_options(layers: Layers) -> str:
    """The worker's one argument: its configuration as JSON."""
    from agentkit.tools.sandbox_policy import seccomp_bpf

    bpf = seccomp_bpf(layers.landlock) if layers.seccomp else b""
    return json.dumps(
        {
            "bpf": base64.b64encode(bpf).decode(),
            "landlock": layers.landlock,
            "pidns": layers.namespaces,
            "sys_path": site_dirs(),
        }
    )


def site_dirs() -> list[str]:
    """Where opt-in modules (numpy, sympy) come from: this interpreter's site-packages."""
    found = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    found += site.getsitepackages()
    return [d for d in dict.fromkeys(found) if Path(d).is_dir()]


def _read_only_views() -> list[tuple[str, str]]:
    """(host path, sandbox path) for what the worker may read; symlinked /lib etc. as links."""
    views = [("/usr", "/usr")]
    for path in ("/etc/ld.so.cache",):
        if Path(path).exists():
            views.append((path, path))
    interpreter = Path(os.path.realpath(sys.executable))
    for prefix in {sys.base_prefix, str(interpreter.parent.parent)}:
        if not prefix.startswith("/usr/"):
            views.append((prefix, prefix))
    views += [(d, d) for d in site_dirs() if not d.startswith(sys.base_prefix)]
    views.append((str(WORKER), WORKER_INSIDE))
    return views


def _tree_args(views: list[tuple[str, str]], *, from_host: bool) -> list[str]:
    args: list[str] = []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    made: set[str] = set()
    for source, target in views:
        for parent in reversed(Path(target).parents):
            name = str(parent)
            if name != "/" and name not in made and not name.startswith("/usr"):
                made.add(name)
                args += ["--perms", "0755", "--dir", name]
        args += ["--ro-bind", source if from_host else target, target]
    return args


def worker_command(layers: Layers, uid: int) -> list[str]:
    """The command line that starts one worker with ``layers`` (see the module docstring)."""
    interpreter = os.path.realpath(sys.executable)
    python = [interpreter, "-I", "-S"]
    options = worker_options(layers)
    if not layers.namespaces:
        return [*python, str(WORKER), options]
    views = _read_only_views()
    inner = [
        "bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
        "--new-session", "--uid", str(uid), "--gid", str(uid), "--cap-drop", "ALL",
        "--hostname", "sandbox",
        # /tmp first: a view below it (a checkout in /tmp) is then bound onto the tmpfs, not
        # hidden under it
        "--size", str(TMP_BYTES), "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev",
        *_tree_args(views, from_host=os.geteuid() != 0), "--chdir", "/tmp", "--clearenv",
    ]  # fmt: skip
    for name, value in ENV.items():
        inner += ["--setenv", name, value]
    inner += [*python, WORKER_INSIDE, options]
    if os.geteuid() != 0:
        return inner
    outer = [
        "bwrap", "--die-with-parent", "--tmpfs", "/tmp", "--bind", "/proc", "/proc",
        "--dev", "/dev", *_tree_args(views, from_host=True),
    ]  # fmt: skip
    drop = [
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
        "--bounding-set=-all", "--no-new-privs", "--",
    ]  # fmt: skip
    return [*outer, *drop, *inner]
