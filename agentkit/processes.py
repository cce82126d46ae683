"""Children started in their own session (``start_new_session=True``) are stopped as a group,
so nothing they started outlives them."""

from __future__ import annotations

import os
import signal
import subprocess


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group ``process`` leads; a group already gone is fine."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the group and reap its leader."""
    signal_group(process, signal.SIGKILL)
    process.wait()
