"""The local Ray runtime a medrl driver starts (``init_ray``) does not outlive it: after a SIGKILL of the driver no
process of that runtime is left (its agents used to stay for minutes). Only the processes of the driver this test
starts are looked at (its process tree, recorded before the kill): other Ray runtimes on the machine are not
touched."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DRIVER = """
import time
import ray
from medrl.config import RayConfig
from medrl.ray_utils import init_ray
init_ray(RayConfig(num_cpus=1))
print(ray.get(ray.remote(lambda: "up").remote()), flush=True)
time.sleep(600)
"""


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def test_a_sigkilled_driver_leaves_no_ray_process_behind():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              env=env, cwd=REPO, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        ready, _, _ = select.select([driver.stdout], [], [], 180)
        assert ready and driver.stdout.readline().strip() == b"up", "the driver did not start Ray"
        deadline = time.time() + 60  # the raylet starts its agents in the background
        while time.time() < deadline:
            tree = _tree(driver.pid)
            titles = [_title(p) for p in tree]
            if any("ray::DashboardAgent" in t for t in titles) and any("ray::RuntimeEnvAgent" in t for t in titles):
                break
            time.sleep(0.5)
        titles = [_title(p) for p in tree]
        assert any("ray::DashboardAgent" in t for t in titles) and any("raylet" in t for t in titles), titles
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert alive == [], [f"{p.pid} {_title(p)}" for p in alive]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for p in tree:  # what this test's driver started, and nothing else
            try:
                p.kill()
            except psutil.Error:
                pass
