"""Judge-store throughput, SQLite vs PostgreSQL (a real server on loopback, durable settings: fsync on).

    .venv/bin/python bench/cache_store.py [--rows 20000] [--seconds 3]

Per backend: batched lookups (``get_many`` of 256 keys, the start of every scored batch), single-key lookups (the
check before a request that waited for the rate limit), and the write path of judged keys as ``Claims`` runs it:
claim, look the claimed keys up once more, put-and-release; one key at a time (one commit each), in group
commits of GROUP (``medrl.reward.store.claims.GroupCommit``: one durable commit per group), and through the scorer's
own path: ``Claims.start`` on batches of BATCH keys with IN_FLIGHT calls at a time that answer after a random
0-2 ms, each judgement put through ``GroupCommit`` and its outcome returned only after its commit (the groups form
from the answers that arrive together; the mean group size is printed).
Figures are per connection from one process on this machine (CPU-bound, shared with the server for PostgreSQL).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from medrl.reward.config import CacheConfig  # noqa: E402
from medrl.reward.judge import JudgeOutcome  # noqa: E402
from medrl.reward.store.claims import Claims, GroupCommit  # noqa: E402
from medrl.reward.store.database import open_store  # noqa: E402
from pg_server import PostgresServer  # noqa: E402


PG = "postgres (loopback, fsync on)"
GROUP = 32
"""Judgements per group commit (``GroupCommit``: those whose responses arrive together; 32 = one actor's default
concurrency)."""
BATCH, IN_FLIGHT = 1024, 64
"""The scorer's path: keys claimed per batch (``reward.judge.batch_size``) and calls in flight."""


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
        assert store.claim_many([f"{i:064x}"], "bench", 30) and not store.get_many([f"{i:064x}"])
        store.put(record(i), holder="bench")
        return 1

    def group_write() -> int:
        batch = [next(fresh) for _ in range(GROUP)]
        claimed = store.claim_many([f"{i:064x}" for i in batch], "bench", 30)
        assert len(claimed) == GROUP and not store.get_many(claimed)
        store.put_many([record(i) for i in batch], holder="bench")
        return GROUP

    commits = []  # records per put_many: the group sizes
    put_many = store.put_many
    store.put_many = lambda records, holder=None: (commits.append(len(records)), put_many(records, holder))

    async def scorer_path() -> tuple[float, float]:
        """Keys/s and mean group size of judged keys through Claims and GroupCommit, for ``seconds``."""
        claims = Claims(store, store.get_many, 30)
        group = GroupCommit(store, claims.holder)
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def call(key: str) -> JudgeOutcome:
            async with slots:
                await asyncio.sleep(rng.random() * 0.002)
            return JudgeOutcome(None, "ok")

        async def put(key: str, outcome: JudgeOutcome) -> None:
            await group.put(record(int(key, 16)))

        n, t0 = 0, time.perf_counter()
        commits.clear()
        while time.perf_counter() - t0 < seconds:
            keys = [f"{next(fresh):064x}" for _ in range(BATCH)]
            futures, started = claims.start(keys, call, put)
            assert len(started) == BATCH
            await asyncio.gather(*futures.values())
            n += BATCH
        wall = time.perf_counter() - t0
        assert store.get_many(keys).keys() == set(keys)
        await claims.close()
        return n / wall, sum(commits) / len(commits)

    keys_s, group_size = asyncio.run(scorer_path())
    out = {"batched lookups/s (256 keys per query)": rate(batch, seconds),
           "single-key lookups/s": rate(single, seconds),
           "judged keys written/s (claim + lookup + put)": rate(judged_write, seconds),
           f"judged keys written/s (group commit of {GROUP})": rate(group_write, seconds),
           f"judged keys/s, scorer path ({IN_FLIGHT} in flight)": keys_s,
           "  mean keys per commit on the scorer path": group_size}
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
        results[PG] = measure(
            CacheConfig(backend="postgres", url_env="MEDRL_BENCH_CACHE_URL"), a.rows, a.seconds)
    metrics = list(next(iter(results.values())))
    print(f"judge store, {a.rows} rows, {a.seconds:g} s per figure, one connection")
    for backend, figures in results.items():
        print(backend)
        for m in metrics:
            print(f"  {m:50s} {figures[m]:>10,.0f}")
    group, path = results[PG][metrics[3]], results[PG][metrics[4]]
    print(f"\ntarget: PostgreSQL judged keys/s per connection, fsync on (>= 2,000): {group:,.0f} in group commits of "
          f"{GROUP}, {path:,.0f} on the scorer's path")


if __name__ == "__main__":
    main()
