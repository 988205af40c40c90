"""Rubric reward cost and throughput: per-criterion vs batched grading through the Ray reward pool against the loopback
judge (200 ms per request).

    .venv/bin/python bench/rubric_reward.py [--items 200] [--criteria 10] [--latency 0.2] [--concurrency 64]

For each mode: judge calls, prompt tokens (and the part the provider's prefix cache serves) and completion tokens
per response, cost per 1,000 responses at DeepSeek prices (``reward.judge.prices``), items (responses) per second,
and a second pass over the same responses (all cached: 0 calls). Two costs are printed: as the loopback server bills
(only the fixed instructions are a cache hit) and with DeepSeek's prefix cache also serving the conversation and
response that calls 2..n of one response share ("shared head"; an estimate from the prompts themselves).
Verdict agreement between the modes needs a real grader (the loopback's verdicts are deterministic per criterion).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from reward_attacks import RUBRIC_CASES  # noqa: E402

from medrl.config import RayConfig  # noqa: E402
from medrl.ray_utils import init_ray  # noqa: E402
from medrl.reward.config import RewardConfig  # noqa: E402
from medrl.reward.criteria import grader_messages  # noqa: E402
from medrl.reward.ledger import Usage, call_cost  # noqa: E402
from medrl.reward.text import estimate_tokens  # noqa: E402
from medrl.reward.types import RewardInput  # noqa: E402
from medrl.testing.loopback_server import LoopbackJudge  # noqa: E402

EXTRA = ["Asks whether the pain started during exertion or at rest.", "Mentions that nitroglycerin should only be "
         "used if it was prescribed.", "Advises not to drive to the hospital alone.", "Uses plain language a "
         "frightened patient can follow.", "Keeps the answer short enough to act on at once.", "Recommends unlocking "
         "the door and staying seated while waiting.", "Claims that the pain is certainly muscular.",
         "Recommends taking ibuprofen for the pain."]
"""Extra criteria (the last two are pitfalls) so a rubric has about HealthBench's ~11 criteria per item."""


def items(n: int, criteria: int) -> list[RewardInput]:
    out = []
    for i in range(n):
        conv, rubric, partial, full = RUBRIC_CASES["zh" if i % 4 == 3 else "en"]
        extra = [{"criterion": c, "points": -5 if k >= 6 else 3, "tags": []} for k, c in enumerate(EXTRA)]
        answer = (full if i % 2 else partial) + f" (case {i}: follow the advice of the emergency team.)"
        out.append(RewardInput(f"b{i}", conv[-1]["content"], f"<think>\nchest pain case {i}\n</think>\n\n{answer}",
                               risk="high", messages=tuple(conv), rubrics=tuple((rubric + extra)[:criteria])))
    return out


def shared_head_cost(cfg: RewardConfig, batch: list[RewardInput], usage: Usage) -> float:
    """Cost if the provider's prefix cache also serves the head (instructions, conversation, response) of calls
    2..n of each response (per-criterion mode)."""
    head = 0
    for it in batch:
        user = grader_messages(it.conversation, it.response.split("</think>")[-1].strip(), it.rubrics[0])[1]
        head += estimate_tokens(user["content"].split("CRITERION:")[0]) * (len(it.rubrics) - 1)
    hit = min(usage.tokens_in, usage.tokens_cache_hit + head)
    return call_cost(Usage(usage.tokens_in, usage.tokens_out, hit), cfg.judge.prices[cfg.judge.model])


def run_mode(mode: str, batch: list[RewardInput], warmup: list[RewardInput], server: LoopbackJudge, a,
             tmp: str) -> dict:
    from medrl.reward.pool import RewardPool

    cfg = RewardConfig.model_validate({
        "preset": "rubric", "rubric": {"mode": mode}, "cache": {"path": f"{tmp}/{mode}.sqlite"},
        "judge": {"base_url": server.base_url, "num_actors": 2, "concurrency": a.concurrency // 2, "rpm": 0,
                  "tpm": 0, "budget_usd": None, "batch_size": 64}})
    server.reset()
    with RewardPool(cfg) as pool:
        pool.score(warmup, progress=False)  # actors started, jieba loaded: not part of the timing
        server.reset()
        t0 = time.perf_counter()
        first = pool.score(batch, progress=False)
        secs = time.perf_counter() - t0
        calls = server.stats()["total"]
        t0 = time.perf_counter()
        second = pool.score(batch, progress=False)
        secs2 = time.perf_counter() - t0
    n = len(batch)
    usage = Usage(sum(r.tokens_in for r in first), sum(r.tokens_out for r in first),
                  sum(r.tokens_cache_hit for r in first))
    cost = sum(r.cost_usd for r in first)
    return {"mode": mode, "calls_per_response": calls / n, "tokens_in_per_response": usage.tokens_in / n,
            "cache_hit_per_response": usage.tokens_cache_hit / n, "tokens_out_per_response": usage.tokens_out / n,
            "usd_per_1k": 1000 * cost / n,
            "usd_per_1k_shared_head": 1000 * shared_head_cost(cfg, batch, usage) / n if mode == "per_criterion"
            else 1000 * cost / n,
            "items_per_s": n / secs, "second_pass_calls": server.stats()["total"] - calls,
            "second_pass_items_per_s": n / secs2, "mean_rubric": sum(r.components.get("rubric", 0) for r in first) / n,
            "failed": sum(r.judge_status == "failed" for r in first),
            "second_all_cached": all(r.judge_status == "cached" for r in second)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--criteria", type=int, default=10)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args()
    os.environ["DEEPSEEK_API_KEY"] = "sk-bench-not-a-real-key"
    batch = items(a.items, a.criteria)
    warmup = [RewardInput(f"w{i}", it.prompt, it.response + " warm-up", risk=it.risk, messages=it.messages,
                          rubrics=it.rubrics) for i, it in enumerate(items(8, a.criteria))]
    init_ray(RayConfig(num_cpus=2))
    rows = []
    with tempfile.TemporaryDirectory(prefix="rrb", dir="/tmp") as tmp, LoopbackJudge(latency_s=a.latency) as server:
        for mode in ("per_criterion", "batched"):
            rows.append(run_mode(mode, batch, warmup, server, a, tmp))
    print(f"{a.items} responses x {a.criteria} criteria, loopback latency {a.latency * 1000:.0f} ms, "
          f"concurrency {a.concurrency}")
    print("| mode | calls/resp | tokens in/resp (cache hit) | tokens out/resp | $/1k resp (billed) | $/1k resp "
          "(shared head cached) | resp/s | 2nd pass calls | 2nd pass resp/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['calls_per_response']:.1f} | {r['tokens_in_per_response']:.0f} "
              f"({r['cache_hit_per_response']:.0f}) | {r['tokens_out_per_response']:.0f} | {r['usd_per_1k']:.3f} | "
              f"{r['usd_per_1k_shared_head']:.3f} | {r['items_per_s']:.1f} | {r['second_pass_calls']} | "
              f"{r['second_pass_items_per_s']:.0f} |")
    for r in rows:
        assert r["failed"] == 0 and r["second_pass_calls"] == 0 and r["second_all_cached"], r
    means = ", ".join(f"{r['mode']} {r['mean_rubric']:.3f}" for r in rows)
    print(f"mean rubric score: {means}")


if __name__ == "__main__":
    main()
