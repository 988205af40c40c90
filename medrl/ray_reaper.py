"""The reaper of a local Ray runtime: ``python -m medrl.ray_reaper DRIVER_PID``, started by ``init_ray`` next to the
runtime it starts, in a session of its own.

Ray ties its GCS server and raylet to the driver (they die with it), but the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) outlive a driver killed by SIGKILL: they notice the raylet is gone, then hang reporting to
the dead GCS. The reaper remembers the Ray processes the driver started (its children run from Ray's package
directory) and everything under them; when the driver dies it ends them (SIGTERM, SIGKILL after ``GRACE_S``). It
touches nothing else: not other Ray runtimes on the machine, not the driver's other children. When the runtime is
shut down normally (its processes are gone while the driver lives) the reaper just exits.
"""
from __future__ import annotations

import importlib.util
import sys
import time

import psutil

POLL_S = 1.0
"""How often the driver and its Ray processes are looked at (each look reads the process table)."""
GRACE_S = 3.0
"""How long reaped processes get to exit after SIGTERM before SIGKILL."""


def ray_package_dir() -> str:
    """Ray's package directory (without importing Ray): every process of a local runtime runs from there."""
    spec = importlib.util.find_spec("ray")
    return spec.submodule_search_locations[0]


def ray_processes(driver: psutil.Process, ray_dir: str) -> list[psutil.Process]:
    """The driver's children started from ``ray_dir`` (GCS, raylet, dashboard, monitors) and all their descendants."""
    found: list[psutil.Process] = []
    for child in driver.children():
        try:
            if any(ray_dir in part for part in child.cmdline()):
                found += [child, *child.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def reap(processes: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL after ``GRACE_S``; psutil refuses a PID reused by another process."""
    alive = []
    for p in processes:
        try:
            p.terminate()
            alive.append(p)
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(alive, timeout=GRACE_S)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            continue


def watch(driver_pid: int) -> None:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    ray_dir = ray_package_dir()
    known: dict[int, psutil.Process] = {}
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                raise psutil.NoSuchProcess(driver_pid)
            current = ray_processes(driver, ray_dir)
        except psutil.NoSuchProcess:
            reap([p for p in known.values() if p.is_running()])
            return
        if known and not current:
            return  # shut down normally while the driver lives
        for p in current:
            known.setdefault(p.pid, p)
        known = {pid: p for pid, p in known.items() if p.is_running()}
        time.sleep(POLL_S)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
