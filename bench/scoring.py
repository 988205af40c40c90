"""Reward-pool throughput against the loopback judge (200 ms per request).

    .venv/bin/python bench/scoring.py [--items 2000] [--latency 0.2] [--concurrency 64] [--actors 2]

Passes: (a) a sequential loop like the seed's (one blocking request at a time, on a sample of items), (b) a bare
aiohttp loop at the same concurrency that does no scoring at all (the ceiling this machine and server allow), (c) the
pool at the given total concurrency on unique items, (d) the same items again (all cached), (e) new items with 20 %
transient faults (429 + Retry-After, 500, 503, timeout, empty content, malformed JSON, each failing once).
The rate limiter and budget are on (rpm 60k, tpm 60M, $100: not binding). Bound = concurrency / latency.
Client CPU = driver + judge actors + coordinator (Ray's own daemons and the server excluded).
Targets: pool >= 0.9 x bound and >= 60 x sequential, cached >= 20k items/s, client CPU < 1 core.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.config import RayConfig  # noqa: E402
from medrl.ray_utils import init_ray  # noqa: E402
from medrl.reward.config import RewardConfig  # noqa: E402
from medrl.reward.types import RewardInput  # noqa: E402
from medrl.testing.loopback_server import LoopbackJudge  # noqa: E402

FAKE_KEY = "sk-bench-not-a-real-key"
FAULTS = ("429", "500", "503", "timeout", "empty", "malformed")
EN_FACTS = ["penicillin", "amoxicillin", "streptococcal", "pharyngitis", "hypertension", "metformin", "insulin",
            "myocardial", "infarction", "aspirin", "troponin", "electrocardiogram", "sepsis", "antibiotics",
            "dehydration", "ibuprofen", "acetaminophen", "asthma", "salbutamol", "corticosteroids"]
ZH_FACTS = ["高血压", "糖尿病", "二甲双胍", "胰岛素", "心肌梗死", "阿司匹林", "抗生素", "青霉素", "发热", "咳嗽"]


def synthetic_items(n: int, tag: str, fault_share: float = 0.0, seed: int = 0) -> list[RewardInput]:
    """Unique, realistic-sized items (~60-token reasoning, ~80-token answer), one in four Chinese."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        if i % 4 == 3:
            facts = rng.sample(ZH_FACTS, 4)
            prompt = f"患者{i}号，{facts[0]}病史，最近{facts[1]}，应该怎么处理？"
            reference = f"考虑{facts[0]}合并{facts[1]}，可使用{facts[2]}，必要时{facts[3]}，请及时就医。"
            answer = (f"根据描述，考虑{facts[0]}合并{facts[1]}。建议在医生指导下使用{facts[2]}，"
                      f"并监测病情变化；必要时{facts[3]}。如出现胸痛或呼吸困难，请立即就医。病例编号{tag}{i}。")
            think = f"患者有{facts[0]}，需要评估{facts[1]}的原因，并排除急症。"
        else:
            facts = rng.sample(EN_FACTS, 5)
            prompt = f"Case {tag}-{i}: a patient with {facts[0]} and {facts[1]} asks what to do next."
            reference = f"Treat {facts[0]} with {facts[2]}; monitor {facts[3]} and check {facts[4]}."
            answer = (f"This presentation suggests {facts[0]} complicated by {facts[1]}. First-line management is "
                      f"{facts[2]}, adjusted to kidney function and allergies. Monitor {facts[3]} closely and "
                      f"check {facts[4]} at follow-up. Seek urgent medical care if chest pain, confusion or "
                      f"breathing difficulty appear. Reference case {tag}-{i}.")
            think = (f"The patient has {facts[0]}. I should consider {facts[1]} and the usual first-line options, "
                     f"then safety-net advice.")
        if fault_share and rng.random() < fault_share:
            answer += f" [[fault:{FAULTS[i % len(FAULTS)]}*1]]"
        items.append(RewardInput(id=f"{tag}{i}", prompt=prompt, response=f"<think>\n{think}\n</think>\n\n{answer}",
                                 reference=reference, language="zh" if i % 4 == 3 else "en"))
    return items


def sequential_baseline(base_url: str, items: list[RewardInput]) -> float:
    """The seed's loop: one blocking request after the other. Returns items/s."""
    import openai

    from medrl.reward.rubric import build_messages, parse_judgement
    from medrl.reward.text import split_response

    client = openai.OpenAI(base_url=base_url, api_key=FAKE_KEY, max_retries=2, timeout=10)
    t0 = time.perf_counter()
    for item in items:
        out = client.chat.completions.create(
            model="deepseek-chat", messages=build_messages(item.prompt, split_response(item.response).answer,
                                                            item.reference),
            temperature=0.0, max_tokens=256, response_format={"type": "json_object"})
        parse_judgement(out.choices[0].message.content)
    return len(items) / (time.perf_counter() - t0)


def bare_client_ceiling(base_url: str, items: list[RewardInput], concurrency: int) -> dict:
    """A bare aiohttp loop at the same concurrency (no openai client, rules, cache or Ray): what this machine and
    server allow at all. Returns the timed_pass-like row."""
    import asyncio

    import aiohttp

    from medrl.reward.rubric import build_messages

    async def run() -> float:
        slots = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {FAKE_KEY}"}) as session:
            async def one(item: RewardInput) -> None:
                async with slots:
                    body = {"model": "deepseek-chat", "messages": build_messages(item.prompt, item.response,
                                                                                 item.reference)}
                    async with session.post(f"{base_url}/chat/completions", json=body) as r:
                        await r.json()

            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in items))
            return time.perf_counter() - t0

    cpu0 = driver_cpu()
    wall = asyncio.run(run())
    return {"items": len(items), "wall_s": wall, "items_s": len(items) / wall,
            "cpu_cores": (driver_cpu() - cpu0) / wall, "http": len(items), "ok": len(items), "cached": 0, "failed": 0}


def driver_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def timed_pass(pool, items: list[RewardInput]) -> dict:
    cpu0 = driver_cpu() + sum(p["cpu_s"] for p in pool.process_info())
    req0 = pool.stats()["http_attempts"]
    t0 = time.perf_counter()
    results = pool.score(items, progress=False)
    wall = time.perf_counter() - t0
    cpu = driver_cpu() + sum(p["cpu_s"] for p in pool.process_info()) - cpu0
    statuses = {s: sum(r.judge_status == s for r in results) for s in ("ok", "cached", "failed")}
    return {"items": len(items), "wall_s": wall, "items_s": len(items) / wall, "cpu_cores": cpu / wall,
            "http": pool.stats()["http_attempts"] - req0, **statuses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--concurrency", type=int, default=64, help="total requests in flight over all actors")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--sequential-items", type=int, default=25)
    a = p.parse_args()
    os.environ["DEEPSEEK_API_KEY"] = FAKE_KEY
    from medrl.reward.pool import RewardPool

    with LoopbackJudge(latency_s=a.latency, api_key=FAKE_KEY) as server, tempfile.TemporaryDirectory() as tmp:
        seq = sequential_baseline(server.base_url, synthetic_items(a.sequential_items, "seq"))
        ceiling = bare_client_ceiling(server.base_url, synthetic_items(a.items, "bare"), a.concurrency)
        init_ray(RayConfig(num_cpus=2))
        cfg = RewardConfig.model_validate({"judge": {
            "base_url": server.base_url, "num_actors": a.actors, "concurrency": a.concurrency // a.actors,
            "rpm": 60_000, "tpm": 60_000_000, "budget_usd": 100.0, "timeout_s": max(1.0, 5 * a.latency),
            "max_retries": 2,
            "batch_size": 1024}, "cache": {"path": f"{tmp}/judge_cache.sqlite"}})
        with RewardPool(cfg) as pool:
            pool.score(synthetic_items(a.actors * 8, "warmup"), progress=False)  # start actors and clients
            rows = [("bare aiohttp loop, no scoring", ceiling),
                    ("pool, unique items", timed_pass(pool, synthetic_items(a.items, "u")))]
            rows.append(("pool, same items again (cached)", timed_pass(pool, synthetic_items(a.items, "u"))))
            rows.append(("pool, new items, 20% faults", timed_pass(pool, synthetic_items(a.items, "f", 0.2, 1))))
    bound = a.concurrency / a.latency
    print(f"\nreward pool vs loopback judge: latency {a.latency * 1000:.0f} ms, concurrency {a.concurrency} "
          f"({a.actors} actors), bound {bound:.0f} items/s, sequential {seq:.2f} items/s "
          f"({a.sequential_items} items), {os.cpu_count()} CPUs on the machine")
    head = f"{'pass':34s} {'items':>6s} {'sec':>7s} {'items/s':>9s} {'x bound':>8s} {'x seq':>7s} " \
           f"{'CPU cores':>9s} {'HTTP':>6s} {'ok':>5s} {'cached':>6s} {'failed':>6s}"
    print(head + "\n" + "-" * len(head))
    for name, r in rows:
        print(f"{name:34s} {r['items']:6d} {r['wall_s']:7.2f} {r['items_s']:9.1f} {r['items_s'] / bound:8.2f} "
              f"{r['items_s'] / seq:7.1f} {r['cpu_cores']:9.2f} {r['http']:6d} {r['ok']:5d} {r['cached']:6d} "
              f"{r['failed']:6d}")


if __name__ == "__main__":
    main()
