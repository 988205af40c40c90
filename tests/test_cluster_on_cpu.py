"""Cluster mode on a real two-node Ray cluster (two raylets on this machine) with a real PostgreSQL server and the
loopback judge, all inside a network namespace with only loopback up: ``ray job submit`` of the scoring job with
judge actors on both nodes, concurrent jobs that pay no key twice (PostgreSQL, and SQLite on one machine), a second
pass that makes no request, and the second node's raylet SIGKILLed mid-job. The cases are in
``tests/netns_cluster.py``; this test runs them under ``unshare -n`` (root, as in CI) and fails with their output."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns_cluster import NETNS_LAUNCH
from pg_server import pg_bin

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the cases run in one inner pytest (its own timeout); ~10 min on a loaded 2-core box
def test_cluster_cases_in_a_loopback_only_network_namespace(tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the cluster test needs root and unshare(1) in CI")
        pytest.skip("needs root and unshare(1) for a private network namespace")
    if pg_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is missing in CI (.ci/run installs it)")
        pytest.skip("PostgreSQL not installed (apt-get install -y postgresql)")
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["unshare", "-n", "--", sys.executable, "-c", NETNS_LAUNCH, sys.executable, "-m", "pytest", "-q", "-x",
         "-p", "no:cacheprovider",
         "--basetemp", str(tmp_path / "inner"), "-o", "addopts=--timeout=1200",
         str(REPO / "tests" / "netns_cluster.py")],
        cwd=REPO, capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-3000:], proc.stderr[-3000:], f"cluster cases took {time.perf_counter() - t0:.0f} s", sep="\n")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
