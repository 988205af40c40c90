"""Stopping what a test started, by PID: a process group (SIGTERM, then SIGKILL) and a ``ray start`` node."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0, kill_s: float = 10.0) -> None:
    """SIGTERM to ``proc``'s process group (``ray start --block`` cleans up on it), SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_s)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def stop_ray_node(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Stop a ``ray start --block`` node started in its own group with a private ``--temp-dir``; what left the group
    (Ray's workers, its dashboard) still carries that dir on its command line and is killed by it; the dir goes."""
    stop_group(proc)
    subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)
    shutil.rmtree(temp_dir, ignore_errors=True)
