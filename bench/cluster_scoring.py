"""Scoring throughput on one Ray node vs two: the same pool (PostgreSQL store, loopback judge) on a head alone,
then on the head plus a second raylet, both on this machine inside a private loopback-only network namespace.

    sudo .venv/bin/python bench/cluster_scoring.py [--items 1500] [--latency 0.05] [--actors 2] [--concurrency 32]

Both nodes share this machine's cores, so two nodes cannot be faster here when scoring is CPU-bound: the figure
shows what spreading the judge actors costs or gains on one box, not what a real second machine adds.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from netns_cluster import NETNS_LAUNCH, Cluster  # noqa: E402
from pg_server import PostgresServer  # noqa: E402

FAKE_KEY = "sk-bench-not-a-real-key"


def timed_pass(cfg, tag: str, n: int) -> tuple[float, int]:
    import ray

    from medrl.reward.pool import RewardPool
    from medrl.reward.types import RewardInput

    items = [RewardInput(id=f"{tag}-{i}", prompt=f"{tag} case {i}: fever and sore throat?",
                         response=f"<think>\nstrep {i}\n</think>\n\nAmoxicillin for streptococcal pharyngitis ({i}).",
                         reference="Amoxicillin for streptococcal pharyngitis.") for i in range(n)]
    ray.init(address="127.0.0.1:6379", log_to_driver=False)
    try:
        with RewardPool(cfg) as pool:
            pool.score(items[:64], progress=False)  # actors and clients up
            nodes = len({p["node"] for p in pool.process_info()[:-1]})
            t0 = time.perf_counter()
            pool.score(items[64:], progress=False)
            return (n - 64) / (time.perf_counter() - t0), nodes
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1500)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32)
    a = p.parse_args()
    if os.environ.get("MEDRL_BENCH_IN_NETNS") != "1":
        env = dict(os.environ, MEDRL_BENCH_IN_NETNS="1")
        sys.exit(subprocess.call(["unshare", "-n", "--", sys.executable, "-c", NETNS_LAUNCH, sys.executable,
                                  *sys.argv], env=env))
    from medrl.reward.config import RewardConfig
    from medrl.testing.loopback_server import LoopbackJudge

    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_AUTH_MODE="disabled", DEEPSEEK_API_KEY=FAKE_KEY)
    with PostgresServer(fast=False) as pg, LoopbackJudge(latency_s=a.latency, api_key=FAKE_KEY) as judge, \
            tempfile.TemporaryDirectory() as tmp:
        os.environ["MEDRL_CACHE_URL"] = pg.url
        cfg = RewardConfig.model_validate({
            "judge": {"base_url": judge.base_url, "num_actors": a.actors, "concurrency": a.concurrency,
                      "rpm": 0, "tpm": 0, "budget_usd": None, "batch_size": 256, "timeout_s": 10},
            "cache": {"backend": "postgres"}})
        cluster = Cluster(Path(tmp), dict(os.environ))
        rows = []
        try:
            cluster.start_head()
            rows.append(("one node", *timed_pass(cfg, "one", a.items)))
            cluster.start_node_b()
            time.sleep(2)
            rows.append(("two nodes", *timed_pass(cfg, "two", a.items)))
        finally:
            cluster.stop()
    print(f"scoring {a.items - 64} unique items, {a.actors} judge actors x {a.concurrency} concurrent, loopback judge "
          f"{a.latency * 1000:.0f} ms, PostgreSQL store; bound = {a.actors * a.concurrency / a.latency:.0f} items/s")
    for name, per_s, nodes in rows:
        print(f"  {name:10s} {per_s:8.1f} items/s  (judge actors on {nodes} node(s))")


if __name__ == "__main__":
    main()
