"""What a PPO step reports: its ``metrics.jsonl`` row (``StepRecord``, filled phase by phase; ``reward_metrics``)
and its ``samples.jsonl`` rows. No Ray in here."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from medrl.ppo.batch import Batch
from medrl.reward.types import RewardResult


LEARN_PHASES = ("experience", "advantages", "train", "publish")
"""The phases after the rewards whose times add up to ``time_learn_s``."""


class StepRecord:
    """One step's metrics row as the step goes: ``timed`` runs a phase and adds its seconds to ``time_<phase>_s``
    (a phase may take several calls), ``add`` takes the figures a phase reports, ``finish`` completes the row."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.row: dict[str, float] = {}

    def timed(self, phase: str, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            key = f"time_{phase}_s"
            self.row[key] = self.row.get(key, 0.0) + time.perf_counter() - t

    def add(self, **metrics: float) -> None:
        self.row.update(metrics)

    def finish(self, scored: Batch, learned: Batch, **extra: float) -> dict[str, float]:
        """The row: reward metrics of the rows ``learned`` from (none, an update skipped: of all ``scored`` rows not
        dropped), what the phases added, ``time_learn_s`` (experience + advantages + train + publish) and
        ``time_step_s``."""
        kept = learned.results or [r for r in scored.results if not r.dropped]
        row = {**reward_metrics(kept, scored.results), **self.row, **extra, "samples": len(learned),
               "update_skipped": int(not len(learned))}
        row["time_learn_s"] = sum(row.get(f"time_{phase}_s", 0.0) for phase in LEARN_PHASES)
        row["time_step_s"] = time.perf_counter() - self.started
        return row


def reward_metrics(kept: list[RewardResult], results: list[RewardResult]) -> dict[str, float]:
    """Reward mean / std and per-component means of the samples the update uses (``kept``); judge counts, tokens,
    cost and cache hit rate of all of them (``results``, dropped ones included); ``judge_unscored_frac``: the share
    left unscored (failed judgement, ``reward.judge.on_failure: drop``), out of their groups and the loss."""
    rewards = np.array([r.reward for r in kept])
    out = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
    for name in sorted({k for r in kept for k in r.components}):
        out[f"reward/{name}"] = float(np.mean([r.components[name] for r in kept if name in r.components]))
    status = [r.judge_status for r in results]
    judged = status.count("ok") + status.count("cached")
    dropped = sum(r.dropped for r in results)
    out.update(judge_failed=status.count("failed"), dropped=dropped, judge_unscored_frac=dropped / len(results),
               judge_tokens_in=sum(r.tokens_in for r in results), judge_tokens_out=sum(r.tokens_out for r in results),
               judge_cost_usd=sum(r.cost_usd for r in results),
               cache_hit_rate=status.count("cached") / judged if judged else 0.0)
    return out


SAMPLE_TABLE_COLUMNS = ["id", "sample", "reward", "judge_status", "flags", "response"]
"""The columns of the per-step sample table sent to the trackers (``samples.jsonl`` keeps every field)."""


def append_samples(path: Path, step_no: int, records: list[dict], scored: Batch) -> list[dict]:
    """One ``samples.jsonl`` row per scored row (``records``: the step's prompt records, by prompt index): step,
    prompt id, sample index, response, reward, components, judge status and reason, rule flags, dropped (and a
    consultation's ``dialogue``). Returns the rows written."""
    rows = [{"step": step_no, "id": records[s.prompt_index]["id"], "sample": s.sample_index, "response": s.text,
             "reward": r.reward, "components": r.components, "judge_status": r.judge_status,
             "judge_reason": r.reasons.get("judge", ""), "flags": r.flags, "dropped": r.dropped,
             **({"dialogue": s.dialogue} if s.dialogue else {})}  # a consultation's turns (docs/consultation.md)
            for s, r in zip(scored.samples, scored.results)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return rows
