"""Sandbox overhead per run, and whether one hostile program holds up the others.

1. Per-run overhead, interleaved, same trivial PAL-shaped program (the time is all overhead):
   the sandbox as it is (bubblewrap namespaces, seccomp allowlist, Landlock), the sandbox before
   issue 11 (the commit named by ``--baseline``, loaded from git: a root worker with a seccomp
   denylist), and a fresh ``python -I -c`` (no confinement at all). Target: p50 <= 15 ms.
2. 8 concurrent PAL runs through one Sandbox (default pool), one of them hostile (it closes its
   result pipe and sleeps): every other run must finish within its own time limit.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, write_result

from agentkit.tools.sandbox import Sandbox

PROGRAM = "def solution():\n    total = 16 - 3 - 4\n    return total * 2\n"
RUNS = 200
HOSTILE = "import os, time\ndef solution():\n    os.closerange(3, 64)\n    time.sleep(60)\n"
TIMEOUT_S = 2.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def old_sandbox(commit: str) -> object:
    """``tools/sandbox.py`` and its worker as they were at ``commit``, imported from git."""
    folder = Path(tempfile.mkdtemp(prefix="agentkit-old-sandbox-"))
    for name in ("sandbox.py", "sandbox_worker.py"):
        source = subprocess.run(
            ["git", "show", f"{commit}:tools/{name}"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        (folder / name).write_bytes(source)
    spec = importlib.util.spec_from_file_location("old_sandbox", folder / "sandbox.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Sandbox()


def timed(run: object) -> float:
    started = time.perf_counter()
    result = run()  # type: ignore[operator]
    elapsed = (time.perf_counter() - started) * 1000
    assert getattr(result, "value", 18) == 18, result
    return elapsed


def concurrent_with_a_hostile_run(clients: int = 8) -> dict[str, object]:
    """``clients`` threads at once, the first hostile; how long each of the others took."""
    with Sandbox(timeout_s=TIMEOUT_S, precheck=False, python_guards=False) as box:
        box.start()
        times: dict[int, float] = {}
        results: dict[int, object] = {}

        def client(i: int) -> None:
            started = time.perf_counter()
            results[i] = box.run(HOSTILE if i == 0 else PROGRAM)
            times[i] = time.perf_counter() - started

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        others = [times[i] for i in range(1, clients)]
        return {
            "clients": clients,
            "workers": box.size,
            "hostile_error_type": getattr(results[0], "error_type", None),
            "hostile_s": times[0],
            "others_max_s": max(others),
            "others_ok": all(getattr(results[i], "value", None) == 18 for i in range(1, clients)),
            "others_within_their_limit": max(others) <= TIMEOUT_S,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="556dbe3", help="commit of the old sandbox")
    args = parser.parse_args()
    sandbox = Sandbox()
    sandbox.start()
    before = old_sandbox(args.baseline)
    before.start()  # type: ignore[attr-defined]
    warm, old, fresh = [], [], []
    for i in range(RUNS):  # interleaved so drift hits all alike
        warm.append(timed(lambda: sandbox.run(PROGRAM)))
        old.append(timed(lambda: before.run(PROGRAM)))  # type: ignore[attr-defined]
        if i % 4 == 0:
            started = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-I", "-c", PROGRAM + "print(solution())"],
                capture_output=True,
                text=True,
                check=True,
            )
            fresh.append((time.perf_counter() - started) * 1000)
            assert out.stdout.strip() == "18"
    isolation = sandbox.run(PROGRAM).isolation
    sandbox.close()
    before.close()  # type: ignore[attr-defined]
    result = {
        "runs": RUNS,
        "fresh_runs": len(fresh),
        "isolation": isolation,
        "warm_p50_ms": statistics.median(warm),
        "warm_p95_ms": percentile(warm, 0.95),
        "before_issue11_p50_ms": statistics.median(old),
        "before_issue11_p95_ms": percentile(old, 0.95),
        "ratio_p50_vs_before": statistics.median(warm) / statistics.median(old),
        "fresh_interpreter_p50_ms": statistics.median(fresh),
        "fresh_interpreter_p95_ms": percentile(fresh, 0.95),
        "speedup_p50": statistics.median(fresh) / statistics.median(warm),
        "landlock_abi": sandbox.landlock_abi,
        "concurrent": concurrent_with_a_hostile_run(),
        "target": "warm_p50_ms <= 15; with a hostile run, the others within their time limit",
    }
    result["met"] = (
        result["warm_p50_ms"] <= 15 and result["concurrent"]["others_within_their_limit"]
    )
    write_result("sandbox", result)


if __name__ == "__main__":
    main()
