"""Judge-store throughput, SQLite vs PostgreSQL (a real server on loopback, durable settings: fsync on).

    .venv/bin/python bench/cache_store.py [--rows 20000] [--seconds 3]

Per backend: batched lookups (``get_many`` of 256 keys, the start of every scored batch), single-key lookups (the
check right before a request is sent), and the write path of judged keys: one at a time (claim + put-and-release,
one commit each) and in group commits (``medrl.reward.store.claims.GroupCommit``: one durable commit per group).
Figures are per connection from one process on this machine (CPU-bound, shared with the server for PostgreSQL).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from medrl.reward.config import CacheConfig  # noqa: E402
from medrl.reward.store.database import open_store  # noqa: E402
from pg_server import PostgresServer  # noqa: E402


GROUP = 32
"""Judgements per group commit (``GroupCommit``: those whose responses arrive together; 32 = one actor's default
concurrency)."""


def record(i: int) -> dict:
    return {"key": f"{i:064x}", "judge": "openai:deepseek-chat", "rubric_version": "medrl-rubric-v1", "accuracy": 7,
            "safety": 8, "completeness": 6, "clarity": 9, "reason": "a typical short reason " * 3,
            "prompt": f"patient {i}: fever and sore throat for three days, what should I do?" * 2,
            "answer": f"likely streptococcal pharyngitis; see a doctor for a rapid test ({i})" * 3,
            "reference": "Amoxicillin for streptococcal pharyngitis.", "tokens_in": 600, "tokens_out": 80,
            "tokens_cache_hit": 400, "cost_usd": 0.0001}


def rate(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n / (time.perf_counter() - t0)


def measure(cfg: CacheConfig, rows: int, seconds: float) -> dict:
    store = open_store(cfg)
    columns = list(record(0)) + ["created"]
    insert = (f"INSERT INTO judgements ({', '.join(columns)}) VALUES ({','.join('?' * len(columns))}) "
              "ON CONFLICT (key) DO NOTHING")
    for start in range(0, rows, 1000):  # fill (not timed)
        with store._tx():
            store._run_many(insert, [(*record(i).values(), time.time()) for i in range(start, min(rows, start + 1000))])
    rng = random.Random(0)
    keys = [f"{i:064x}" for i in range(rows)]

    def batch() -> int:
        found = store.get_many(rng.sample(keys, 256))
        assert len(found) == 256
        return 256

    def single() -> int:
        assert store.get_many([rng.choice(keys)])
        return 1

    fresh = iter(range(rows, rows * 100))

    def judged_write() -> int:
        i = next(fresh)
        assert store.claim_many([f"{i:064x}"], "bench", 30)
        store.put(record(i), holder="bench")
        return 1

    def group_write() -> int:
        batch = [next(fresh) for _ in range(GROUP)]
        assert len(store.claim_many([f"{i:064x}" for i in batch], "bench", 30)) == GROUP
        store.put_many([record(i) for i in batch], holder="bench")
        return GROUP

    out = {"batched lookups/s (256 keys per query)": rate(batch, seconds),
           "single-key lookups/s": rate(single, seconds),
           "judged keys written/s (claim + put)": rate(judged_write, seconds),
           f"judged keys written/s (group commit of {GROUP})": rate(group_write, seconds)}
    store.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite (WAL, synchronous=NORMAL)"] = measure(CacheConfig(path=f"{tmp}/bench.sqlite"), a.rows,
                                                               a.seconds)
    with PostgresServer(fast=False) as pg:
        os.environ["MEDRL_BENCH_CACHE_URL"] = pg.url
        results["postgres (loopback, fsync on)"] = measure(
            CacheConfig(backend="postgres", url_env="MEDRL_BENCH_CACHE_URL"), a.rows, a.seconds)
    metrics = list(next(iter(results.values())))
    print(f"judge store, {a.rows} rows, {a.seconds:g} s per figure, one connection")
    for backend, figures in results.items():
        print(backend)
        for m in metrics:
            print(f"  {m:50s} {figures[m]:>10,.0f}")


if __name__ == "__main__":
    main()
