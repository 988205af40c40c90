"""``medrl judge``: score a JSONL file with the rule rewards and the teacher judge (or estimate the cost first)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from medrl.config import Config
from medrl.errors import UsageError
from medrl.jsonl import iter_jsonl
from medrl.reward.config import RewardConfig
from medrl.reward.ledger import Usage, call_cost, warn_if_rate_limit_binds
from medrl.reward.preflight import check_judge
from medrl.reward.rubric import build_messages
from medrl.reward.rubric_reward import graded, plan
from medrl.reward.rules import detect_injection, format_rule
from medrl.reward.store.database import open_store
from medrl.reward.store.schema import judge_key
from medrl.reward.text import estimate_tokens
from medrl.reward.types import RewardInput, RewardResult
from medrl.runs import RunDir

log = logging.getLogger("medrl.reward")

TYPICAL_OUTPUT_TOKENS = 100
"""Dry-run estimate of one verdict's completion tokens (the JSON plus a short reason); the worst case is max_tokens."""


def read_items(path: Path, limit: int | None = None) -> list[RewardInput]:
    """Rows with prompt (or question), response (or output) and optional id, reference, risk, expected_behavior,
    language. Errors name the file and line."""
    items: list[RewardInput] = []
    for lineno, row in iter_jsonl(path, missing_hint="the judge input file"):
        if limit is not None and len(items) >= limit:
            break
        try:
            items.append(RewardInput.from_record(row))
        except ValueError as exc:
            raise UsageError(f"{path}:{lineno}: {exc}") from None
    if not items:
        raise UsageError(f"{path}: no rows to score")
    return items


def _token_counter(cfg: RewardConfig):
    if cfg.judge.tokenizer:
        from transformers import AutoTokenizer

        path = Path(cfg.judge.tokenizer)
        if not path.is_dir():
            raise UsageError(f"reward.judge.tokenizer: directory not found: {path}")
        tok = AutoTokenizer.from_pretrained(str(path))
        return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), f"tokenizer {path}"
    return estimate_tokens, "estimate (CJK char/digit/punctuation = 1, Latin word = letters/4)"


def estimate_cost(cfg: RewardConfig, items: list[RewardInput]) -> dict:
    """What judging ``items`` would cost, without calling the judge: the Likert judgements (``w_teacher`` > 0) and
    the rubric criterion verdicts (``w_rubric`` > 0, prompts with a rubric); cached and duplicate calls are free,
    each fixed system prompt is billed at the cache-hit price after its first call (DeepSeek prefix cache)."""
    jc = cfg.judge
    count, counter = _token_counter(cfg)
    out = {"items": len(items), "judge": jc.judge_id, "token_counter": counter, "budget_usd": jc.budget_usd}
    if jc.provider != "openai":
        return {**out, "to_judge": 0, "cost_usd_typical": 0.0, "cost_usd_max": 0.0}
    calls: dict[str, Callable[[], list[dict]]] = {}
    injected = asked = 0
    for item in items:
        if detect_injection(item.response):
            injected += 1
            continue
        answer = item.parsed.answer
        if cfg.w_teacher > 0:
            asked += 1
            calls.setdefault(judge_key(cfg, item, answer), lambda it=item, a=answer: build_messages(
                it.prompt, a, it.reference))
        if graded(cfg, item):
            p = plan(cfg, item, answer, format_rule(item.response, cfg.rules.format.no_think_score).score)
            asked += len(p.asks)
            for key, ask in p.asks.items():
                calls.setdefault(key, ask.messages)
    cache = open_store(cfg.cache, readonly=True)
    cached = cache.get_many(calls)
    cache.close()
    todo = [build() for key, build in calls.items() if key not in cached]
    systems = [count(m[0]["content"]) for m in todo]
    tokens_in = sum(systems) + sum(count(m[1]["content"]) for m in todo)
    first = {m[0]["content"]: n for m, n in zip(todo, systems)}  # one full-price system prompt each
    hit = sum(systems) - sum(first.values())
    price = jc.prices[jc.model]
    typical = call_cost(Usage(tokens_in, TYPICAL_OUTPUT_TOKENS * len(todo), hit), price)
    worst = call_cost(Usage(tokens_in, jc.max_tokens * len(todo), 0), price)
    return {**out, "cached": len(cached), "duplicates": asked - len(calls),
            "prompt_injection": injected, "to_judge": len(todo), "tokens_in": tokens_in,
            "tokens_in_cache_hit_expected": hit, "tokens_out_typical": TYPICAL_OUTPUT_TOKENS * len(todo),
            "tokens_out_max": jc.max_tokens * len(todo), "cost_usd_typical": round(typical, 6),
            "cost_usd_max": round(worst, 6)}


def _describe_estimate(est: dict) -> str:
    line = f"dry run ({est['judge']}): {est['items']} items, {est['to_judge']} to judge"
    if "tokens_in" in est:
        line += (f" ({est['cached']} cached, {est['duplicates']} duplicates, {est['prompt_injection']} injections "
                 f"not sent); tokens in {est['tokens_in']} (~{est['tokens_in_cache_hit_expected']} cache hits), "
                 f"out ~{est['tokens_out_typical']} (max {est['tokens_out_max']})")
    return (line + f"; cost ~${est['cost_usd_typical']:.4f} (max ${est['cost_usd_max']:.4f}); "
            f"tokens: {est['token_counter']}")


def summarize(results: list[RewardResult], seconds: float) -> dict:
    statuses = ("ok", "cached", "failed", "over_budget", "skipped", "disabled")
    n = len(results)
    return {"items": n, "judge": results[0].judge if results else "none",
            **{("judged" if s == "ok" else s): sum(r.judge_status == s for r in results) for s in statuses},
            "dropped": sum(r.dropped for r in results),
            "prompt_injection": sum("prompt_injection" in r.flags for r in results),
            "score_dictation": sum("score_dictation" in r.flags for r in results),
            "rubric_gaming": sum("rubric_gaming" in r.flags for r in results),
            "tokens_in": sum(r.tokens_in for r in results), "tokens_out": sum(r.tokens_out for r in results),
            "tokens_cache_hit": sum(r.tokens_cache_hit for r in results),
            "cost_usd": round(sum(r.cost_usd for r in results), 6), "seconds": round(seconds, 2),
            "items_per_s": round(n / seconds, 1) if seconds > 0 else None,
            "mean_reward": round(sum(r.reward for r in results) / n, 4) if n else None}


def run_judge(cfg: Config, run: RunDir, *, input_path: Path, out_path: Path, limit: int | None,
              dry_run: bool) -> dict:
    items = read_items(Path(input_path), limit)
    check_judge(cfg.reward, call=not dry_run)  # key, cache file and endpoint (the cache alone for an estimate)
    if dry_run:
        est = estimate_cost(cfg.reward, items)
        print(_describe_estimate(est))
        return est
    import ray

    from medrl.ray_utils import init_ray
    from medrl.reward.pool import RewardPool

    run.record_stage(cfg, "judge")
    started = init_ray(cfg.ray)
    try:
        with RewardPool(cfg.reward, run) as pool:
            t0 = time.perf_counter()
            results = pool.score(items, progress=True)
            summary = summarize(results, time.perf_counter() - t0)
            pool_stats = pool.stats()
            summary["judge_nodes"] = len({p["node"] for p in pool.process_info()[:-1]})
        # judge calls made, and HTTP attempts (the openai client's retries included): what the provider may bill
        summary["requests"], summary["http_attempts"] = pool_stats["requests"], pool_stats["http_attempts"]
        summary["rate_limited_calls"] = pool_stats.get("rate_limited_calls", 0)
        summary["rate_wait_call_s"] = pool_stats.get("rate_wait_call_s", 0.0)
        warn_if_rate_limit_binds(cfg.reward.judge, summary["rate_wait_call_s"], summary["rate_limited_calls"],
                                 summary["seconds"])
    finally:
        if started:
            ray.shutdown()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    if cfg.reward.judge.provider == "openai":
        cache = open_store(cfg.reward.cache, readonly=True)
        keys = [judge_key(cfg.reward, it, it.parsed.answer) for it in items]
        summary["teacher_judgements"] = cache.export_jsonl(run.teacher_judgements, keys)
        cache.close()
    summary["out"] = str(out_path)
    log.info("judge summary: %s", json.dumps(summary, ensure_ascii=False))
    print(f"judge {summary['judge']}: {summary['items']} items in {summary['seconds']}s "
          f"({summary['items_per_s']}/s): judged {summary['judged']}, cached {summary['cached']}, failed "
          f"{summary['failed']}, over budget {summary['over_budget']}, skipped {summary['skipped']}, dropped "
          f"{summary['dropped']}, injections {summary['prompt_injection']}, self-graded {summary['score_dictation']}, "
          f"rubric gaming {summary['rubric_gaming']}; "
          f"tokens in {summary['tokens_in']} (cache hit {summary['tokens_cache_hit']}), out {summary['tokens_out']}; "
          f"cost ${summary['cost_usd']:.4f}; rate limit waits {summary['rate_wait_call_s']:.0f} call-s "
          f"({summary['rate_limited_calls']} calls held); mean reward {summary['mean_reward']} -> {out_path}")
    return summary
