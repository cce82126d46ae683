"""The 37 published sandbox attacks in ../shared/security: none may show any effect.

Each attack runs three times: with every layer, and with the Python-level layers (AST pre-check,
trimmed builtins, import guard) switched off, so the OS-level confinement alone must hold, and
a third time without Landlock too (the explicit, reported weakening for kernels that lack it:
seccomp refuses open). The harness follows ../shared/security/README.md. A worker is a process
tree (bubblewrap, its init, the interpreter): "no child outlives its run" means the tree is as
big after the run as it was before it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import SHARED

from agentkit.tools.sandbox import Sandbox

ATTACKS = sorted((SHARED / "security" / "attacks").glob("*.py"))
MARKER = Path("/tmp/agentkit-attack-marker")
SECRET_FILE = Path("/tmp/agentkit-attack-secret.txt")
TIMEOUT_S = 1.5
MARGIN_S = 2.0
OUTPUT_CAP = 10_000


class Listener:
    """Listens on 127.0.0.1:47123 and records every connection that arrives."""

    def __init__(self) -> None:
        self.connections = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 47123))
        self.sock.listen()
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def harness():
    secret_file_value = secrets.token_hex(16)
    secret_env_value = secrets.token_hex(16)
    SECRET_FILE.write_text(secret_file_value)
    old_env = os.environ.get("AGENTKIT_ATTACK_SECRET")
    os.environ["AGENTKIT_ATTACK_SECRET"] = secret_env_value
    listener = Listener()
    boxes = {
        mode: Sandbox(
            timeout_s=TIMEOUT_S,
            memory_mb=128,
            max_output_chars=OUTPUT_CAP,
            precheck=mode == "precheck",
            python_guards=mode == "precheck",
            landlock=mode != "seccomp-only",
            allow_weak=mode == "seccomp-only",
            workers=1,
        )
        for mode in ("precheck", "os-only", "seccomp-only")
    }
    for box in boxes.values():
        box.start()
    yield boxes, (secret_file_value, secret_env_value), listener
    for box in boxes.values():
        box.close()
    listener.close()
    SECRET_FILE.unlink(missing_ok=True)
    if old_env is None:
        os.environ.pop("AGENTKIT_ATTACK_SECRET", None)
    else:
        os.environ["AGENTKIT_ATTACK_SECRET"] = old_env


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` on the host."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def worker_tree(box: Sandbox) -> set[int]:
    (pid,) = box.worker_pids()
    return {pid} | descendants(pid)


def test_the_attack_corpus_is_there() -> None:
    assert len(ATTACKS) == 37


@pytest.mark.parametrize("mode", ["precheck", "os-only", "seccomp-only"])
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda p: p.stem)
def test_attack_has_no_effect(attack: Path, mode: str, harness) -> None:
    boxes, leaked_values, listener = harness
    box: Sandbox = boxes[mode]
    MARKER.unlink(missing_ok=True)
    before = listener.connections
    tree = worker_tree(box)
    started = time.monotonic()
    result = box.run(attack.read_text())
    elapsed = time.monotonic() - started
    time.sleep(0.05)  # let any escaped side effect land before we look
    assert not MARKER.exists(), f"{attack.name} left the marker file: {result}"
    shown = json.dumps(result.to_dict())
    for value in leaked_values:
        assert value not in shown, f"{attack.name} leaked a secret: {shown[:300]}"
    assert listener.connections == before, f"{attack.name} reached the network"
    assert elapsed <= TIMEOUT_S + MARGIN_S, f"{attack.name} took {elapsed:.1f} s"
    assert len(result.stdout) <= OUTPUT_CAP and len(shown) < OUTPUT_CAP + 5_000
    if "/etc/passwd" in attack.read_text():
        assert "root:" not in shown
    assert worker_tree(box) == tree, "a child outlived its run, or the worker died"
    after = box.run("def solution():\n    return 6 * 7")  # the host keeps serving
    assert after.ok and after.value == 42
