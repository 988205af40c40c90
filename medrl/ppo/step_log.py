"""What a PPO step reports about its rewards: the reward metrics of ``metrics.jsonl`` and the rows of
``samples.jsonl``. No Ray in here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medrl.ppo.batch import Sample
from medrl.reward.types import RewardResult


def reward_metrics(kept: list[RewardResult], results: list[RewardResult]) -> dict[str, float]:
    """Reward mean / std and per-component means of the samples the update uses (``kept``); judge counts, tokens,
    cost and cache hit rate of all of them (``results``, dropped ones included)."""
    rewards = np.array([r.reward for r in kept])
    out = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
    for name in sorted({k for r in kept for k in r.components}):
        out[f"reward/{name}"] = float(np.mean([r.components[name] for r in kept if name in r.components]))
    status = [r.judge_status for r in results]
    judged = status.count("ok") + status.count("cached")
    out.update(judge_failed=status.count("failed"), dropped=sum(r.dropped for r in results),
               judge_tokens_in=sum(r.tokens_in for r in results), judge_tokens_out=sum(r.tokens_out for r in results),
               judge_cost_usd=sum(r.cost_usd for r in results),
               cache_hit_rate=status.count("cached") / judged if judged else 0.0)
    return out


def append_samples(path: Path, step_no: int, records: list[dict], samples: list[Sample],
                   results: list[RewardResult]) -> None:
    """One ``samples.jsonl`` row per scored sample: step, prompt id, sample index, response, reward, components,
    judge status and reason, rule flags, dropped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for s, r in zip(samples, results):
            f.write(json.dumps({"step": step_no, "id": records[s.prompt_index]["id"], "sample": s.sample_index,
                                "response": s.text, "reward": r.reward, "components": r.components,
                                "judge_status": r.judge_status, "judge_reason": r.reasons.get("judge", ""),
                                "flags": r.flags, "dropped": r.dropped}, ensure_ascii=False) + "\n")
