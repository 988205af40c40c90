"""Review items and their selection (pure: no I/O beyond the rows given, no Ray, no model).

A review item is one answer a clinician looks at: the question (and the conversation before it), the final answer
(the ``<think>`` block kept apart, shown folded), the reference when known, the judge's four scores (0-10) and
reason, and the rule flags and verdict.
Items come from eval rows (``<run>/eval/<model>.<set>.jsonl``) and optionally PPO samples (``ppo/samples.jsonl``
joined with ``data/rl_prompts.jsonl``).

Selection, in priority order, each reason with its own quota (an item chosen for one reason also records every
other reason that applies to it):

``judge_failed``   the judgement failed or hit the budget cap (nothing checked the answer)
``high_risk``      red-team items and high-risk questions; rule-unsafe answers first, then the lowest teacher scores,
                   taken in turn from each model (and PPO) so every model is reviewed
``lowest_judge``   the lowest teacher scores among the remaining judged answers
``rubric``         answers graded against a rubric (every criterion has a grader verdict), in turn from each model:
                   the reviewer ticks each criterion met / not met, which calibrates the grader
``calibration``    a seeded random share of the rest, stratified by (model, set), so agreement is not measured on
                   hard cases alone

The rule verdict is ``unsafe`` when the safety rule scored 0 (dangerous instructions, a missing refusal with no
referral, a high-risk question without a referral, or a prompt injection), else ``safe``.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from medrl.reward.rubric import DIMENSIONS
from medrl.reward.text import split_response

REASONS = ("judge_failed", "high_risk", "lowest_judge", "rubric", "calibration")
FAILED_STATUSES = ("failed", "over_budget")


@dataclass(frozen=True)
class Quotas:
    judge_failed: int = 20
    high_risk: int = 40
    lowest_judge: int = 20
    calibration: int = 20
    seed: int = 0
    rubric: int = 20


def review_id(source: str, model: str, set_name: str, item_id: str, response: str) -> str:
    """Stable id of one reviewed answer: a hash of where it comes from and the exact response, so labels never
    attach to a different answer after the eval is re-run."""
    blob = "\x1f".join([source, model, set_name, str(item_id), response])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def _scores_0_10(scores: dict | None) -> dict[str, int | None]:
    """Judge dimensions stored in [0, 1] (eval rows, PPO components) back on the rubric's 0-10 scale."""
    scores = scores or {}
    return {d: None if scores.get(d) is None else int(round(10 * float(scores[d]))) for d in DIMENSIONS}


def rule_verdict(safety_score: float | None) -> str | None:
    if safety_score is None:
        return None
    return "unsafe" if safety_score <= 0.0 else "safe"


def _item(source: str, model: str, set_name: str, rec: dict, response: str, *, step: int | None,
          judge_status: str | None, judge_scores: dict | None, judge_reason: str, teacher: float | None,
          reward: float | None, flags: list[str], safety: float | None, criteria: list[dict] | None = None) -> dict:
    parts = split_response(response)
    return {
        "review_id": review_id(source, model, set_name, rec.get("id", ""), response),
        "source": source, "model": model, "set": set_name, "item_id": rec.get("id"), "step": step,
        "question": rec.get("question") or rec.get("prompt") or "", "messages": rec.get("messages"),
        "answer": parts.answer,
        "think": parts.think or "", "reference": rec.get("reference"), "risk": rec.get("risk") or "low",
        "category": rec.get("category"), "expected_behavior": rec.get("expected_behavior"),
        "language": rec.get("language"), "judge_status": judge_status, "judge_scores": _scores_0_10(judge_scores),
        "judge_reason": judge_reason or "", "teacher": teacher, "reward": reward, "rule_flags": list(flags),
        "rule_verdict": rule_verdict(safety), "reasons": [],
        "criteria": [{k: c.get(k) for k in ("criterion", "points", "tags", "met", "explanation")}
                     for c in criteria] if criteria else None,
    }


def items_from_eval(rows: list[dict]) -> list[dict]:
    """Review items of annotated eval rows (any models and sets)."""
    out = []
    for r in rows:
        judge = r.get("judge") or {}
        out.append(_item("eval", r["model"], r["set"], r, r["response"], step=None, judge_status=judge.get("status"),
                         judge_scores=judge.get("scores"), judge_reason=judge.get("reason", ""),
                         teacher=r.get("teacher"), reward=r.get("reward"), flags=r.get("flags") or [],
                         safety=(r.get("rules") or {}).get("safety"), criteria=r.get("criteria")))
    return out


def items_from_ppo(samples: list[dict], prompts: dict[str, dict]) -> list[dict]:
    """Review items of PPO samples; ``prompts`` maps an RL prompt id to its row (prompt, reference, risk...).
    Samples whose prompt is unknown are left out."""
    out = []
    for s in samples:
        rec = prompts.get(s.get("id"))
        if rec is None:
            continue
        comp = s.get("components") or {}
        dims = {d: comp[f"judge.{d}"] for d in DIMENSIONS if f"judge.{d}" in comp}
        set_name = "redteam" if rec.get("source") == "redteam" else "rl_prompts"
        out.append(_item("ppo", "ppo", set_name, rec, s["response"], step=s.get("step"),
                         judge_status=s.get("judge_status"), judge_scores=dims or None,
                         judge_reason=s.get("judge_reason", ""), teacher=comp.get("teacher"), reward=s.get("reward"),
                         flags=s.get("flags") or [], safety=comp.get("safety")))
    return out


def _round_robin(groups: dict[str, list[dict]]) -> list[dict]:
    """One item from each group in turn (groups keep their own order)."""
    out, rank = [], 0
    while any(rank < len(g) for g in groups.values()):
        out += [g[rank] for g in groups.values() if rank < len(g)]
        rank += 1
    return out


def _by_model(items: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(it["model"], []).append(it)
    return groups


def _teacher_key(it: dict) -> float:
    return it["teacher"] if it["teacher"] is not None else 2.0


def qualifies(it: dict) -> dict[str, bool]:
    """Which of the hard-case reasons an item meets (calibration is given at selection)."""
    return {"judge_failed": it["judge_status"] in FAILED_STATUSES,
            "high_risk": it["set"] == "redteam" or it["risk"] == "high",
            "lowest_judge": it["teacher"] is not None,
            "rubric": bool(it.get("criteria")) and all(c["met"] is not None for c in it["criteria"])}


def select(items: list[dict], quotas: Quotas) -> list[dict]:
    """The review package: items chosen by the quotas above (deduplicated), in a seeded shuffled order so that
    models and reasons are interleaved (the reviewer cannot tell which model wrote an answer from its position)."""
    rng = random.Random(quotas.seed)
    unique = list({it["review_id"]: it for it in items}.values())  # identical answers are reviewed once
    meets = {it["review_id"]: qualifies(it) for it in unique}
    chosen: dict[str, dict] = {}

    def take(pool: list[dict], n: int) -> int:
        """Add the first ``n`` items of ``pool`` not chosen yet; returns how far into ``pool`` it went."""
        scanned = 0
        for it in pool:
            if n <= 0:
                break
            scanned += 1
            if it["review_id"] not in chosen:
                chosen[it["review_id"]] = it
                n -= 1
        return scanned

    take([it for it in unique if meets[it["review_id"]]["judge_failed"]], quotas.judge_failed)
    risky = sorted((it for it in unique if meets[it["review_id"]]["high_risk"]),
                   key=lambda it: (it["rule_verdict"] != "unsafe", _teacher_key(it)))
    take(_round_robin(_by_model(risky)), quotas.high_risk)
    judged = sorted((it for it in unique if meets[it["review_id"]]["lowest_judge"]), key=_teacher_key)
    lowest = {it["review_id"] for it in judged[:take(judged, quotas.lowest_judge)]}
    take(_round_robin(_by_model([it for it in unique if meets[it["review_id"]]["rubric"]])), quotas.rubric)
    rest = [it for it in unique if it["review_id"] not in chosen]
    strata: dict[str, list[dict]] = {}
    for it in rest:
        strata.setdefault(f"{it['model']}/{it['set']}", []).append(it)
    for group in strata.values():
        rng.shuffle(group)
    calibration = {it["review_id"] for it in _round_robin(dict(sorted(strata.items())))[:quotas.calibration]}
    take([it for it in rest if it["review_id"] in calibration], quotas.calibration)
    out = []
    for it in chosen.values():
        reasons = [r for r, ok in meets[it["review_id"]].items() if ok and r != "lowest_judge"]
        if it["review_id"] in lowest:
            reasons.append("lowest_judge")
        if it["review_id"] in calibration:
            reasons.append("calibration")
        out.append({**it, "reasons": [r for r in REASONS if r in reasons]})
    rng.shuffle(out)
    return out
