"""Rubric reward (``reward.w_rubric``, ``reward.rubric``): the judge store keys of a response's criterion verdicts,
the calls (``Ask``) that resolve them, the offline grading, and the merge into a RewardResult (no Ray).

Per criterion (HealthBench's protocol) a verdict is keyed by (grader model, grader version, conversation, final
answer, criterion with its points); batched, one verdict list by (..., all criteria). The Scorer claims, rate-limits,
budgets, caches and retries these keys exactly as it does the Likert judgements. Component ``rubric`` = the item
score (``criteria.item_score``) clipped to [0, 1]; a response with a criterion whose grading failed gets no rubric
score (status ``failed``, as a failed judgement).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from medrl.reward.config import RewardConfig
from medrl.reward.criteria import (batch_grader_messages, clipped, conversation_text, criterion_line,
                                   grader_messages, item_score, parse_batch, parse_criterion)
from medrl.reward.judge import JudgeOutcome
from medrl.reward.ledger import Usage
from medrl.reward.rubric_guard import offline_criteria, rubric_gaming
from medrl.reward.rules import covered_text
from medrl.reward.store.schema import cache_key
from medrl.reward.types import RewardInput, RewardResult

_PRECEDENCE = ("disabled", "skipped", "cached", "ok", "over_budget", "failed")


@dataclass
class Ask:
    """One judge call the store knows by its key: the messages sent (built when the call is made), how the reply is
    read (``parse``), what is stored for the verdict (``record``: store columns) and how a stored record is read back
    (``verdict``)."""

    item_id: str
    messages: Callable[[], list[dict[str, str]]]
    parse: Callable[[str | None], Any]
    record: Callable[[Any], dict]
    verdict: Callable[[dict], Any]


@dataclass
class RubricPlan:
    """The rubric grading of one response: its criteria and the keys of their verdicts (none when ``fixed``)."""

    criteria: list[dict]
    keys: list[str] = field(default_factory=list)
    """per_criterion: one key per criterion; batched: one key."""
    asks: dict[str, Ask] = field(default_factory=dict)
    fixed: str | None = None
    """Not graded, and why (rubric gaming, broken format): score 0, no call."""
    batched: bool = False


@dataclass
class RubricOutcome:
    criteria: list[dict]
    status: str
    reason: str = ""
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    flags: list[str] = field(default_factory=list)

    @property
    def score(self) -> float | None:
        """The rubric component: the item score clipped to [0, 1]; None when a criterion has no verdict."""
        if any(c["met"] is None for c in self.criteria):
            return None
        return clipped(item_score([c["points"] for c in self.criteria], [c["met"] for c in self.criteria]))


def graded(cfg: RewardConfig, item: RewardInput) -> bool:
    """Whether ``item``'s rubric is graded (it has one and ``w_rubric`` > 0)."""
    return bool(item.rubrics) and cfg.weights(item).rubric > 0


def _criteria(cfg: RewardConfig, item: RewardInput) -> list[dict]:
    return [dict(c) for c in item.rubrics[:cfg.rubric.max_criteria]]


def _stored(cfg: RewardConfig, conversation: str, answer: str, reference: str, version: str, met: int,
            reason: str) -> dict:
    return {"judge": f"{cfg.judge.judge_id}#rubric", "rubric_version": version, "accuracy": met, "safety": 0,
            "completeness": 0, "clarity": 0, "reason": reason, "prompt": conversation, "answer": answer,
            "reference": reference}


def graded_answer(cfg: RewardConfig, answer: str, criteria: list[dict]) -> str:
    """What the grader sees: the final answer with keyword lists and term stuffing (``rules.covered_text``, the
    criteria as the reference) blanked, so stuffing reaches no grader, and stuffed variants of an answer share its
    verdicts in the store."""
    return covered_text(answer, " ".join(c["criterion"] for c in criteria), cfg.rules.keywords.min_list_run)[0]


def plan(cfg: RewardConfig, item: RewardInput, answer: str, format_score: float) -> RubricPlan:
    """The keys and calls of ``item``'s rubric (``answer``: its final answer), or a fixed outcome: a response that
    games the rubric (``rubric_guard.rubric_gaming``) or, with ``format_gate``, has a broken format is not sent."""
    criteria = _criteria(cfg, item)
    gaming = rubric_gaming(answer, [c["criterion"] for c in criteria])
    if gaming:
        return RubricPlan(criteria, fixed=f"rubric gaming: {gaming}")
    if cfg.rubric.format_gate and format_score == 0:
        return RubricPlan(criteria, fixed="format gate: broken think-then-answer format")
    if cfg.judge.provider != "openai":
        return RubricPlan(criteria)
    answer = graded_answer(cfg, answer, criteria)
    conv, rc, model = conversation_text(item.conversation), cfg.rubric, cfg.judge.model
    out = RubricPlan(criteria, batched=rc.mode == "batched")
    if rc.mode == "batched":
        lines = json.dumps([criterion_line(c) for c in criteria], ensure_ascii=False)
        version = f"{rc.grader_version}/batched"
        key = cache_key(model, version, conv, answer, lines)
        out.keys.append(key)
        out.asks[key] = Ask(item.id, lambda: batch_grader_messages(item.conversation, answer, criteria),
                            parse_batch(len(criteria)),
                            lambda v: _stored(cfg, conv, answer, lines, version, sum(m for m, _ in v),
                                              json.dumps(v, ensure_ascii=False)),
                            lambda rec: [tuple(x) for x in json.loads(rec["reason"])])
        return out
    for c in criteria:
        line = criterion_line(c)
        key = cache_key(model, rc.grader_version, conv, answer, line)
        out.keys.append(key)
        out.asks[key] = Ask(item.id, lambda c=c: grader_messages(item.conversation, answer, c), parse_criterion,
                            lambda v, line=line: _stored(cfg, conv, answer, line, rc.grader_version, 10 * v[0], v[1]),
                            lambda rec: (rec["accuracy"] == 10, rec["reason"]))
    return out


def _filled(criteria: list[dict], verdicts: list[tuple[bool | None, str]]) -> list[dict]:
    return [{**c, "met": met, "explanation": why} for c, (met, why) in zip(criteria, verdicts)]


def fixed_outcome(p: RubricPlan) -> RubricOutcome:
    """A response not sent: it counts against itself (positive criteria not met, negative ones met for gaming; for a
    broken format nothing is met)."""
    gaming = p.fixed.startswith("rubric gaming")
    verdicts = [(gaming and c["points"] < 0, f"not graded: {p.fixed}") for c in p.criteria]
    return RubricOutcome(_filled(p.criteria, verdicts), "skipped", p.fixed, flags=["rubric_gaming"] if gaming else [])


def offline_outcome(cfg: RewardConfig, p: RubricPlan, answer: str) -> RubricOutcome:
    """``judge.provider: reference``: the deterministic offline grader."""
    verdicts = offline_criteria(graded_answer(cfg, answer, p.criteria), [c["criterion"] for c in p.criteria])
    return RubricOutcome(_filled(p.criteria, verdicts), "ok")


def judged_outcome(p: RubricPlan, outcomes: dict[str, JudgeOutcome]) -> RubricOutcome:
    """The criteria verdicts of ``p`` from its keys' outcomes (cached, judged, shared, failed or over budget)."""
    usage, cost, statuses, reasons = Usage(), 0.0, [], []
    verdicts: list[tuple[bool | None, str]] = []
    for key in p.keys:
        out = outcomes[key]
        usage.add(out.usage)
        cost += out.cost_usd
        statuses.append(out.status)
        if out.judgement is None:
            reasons.append(out.reason)
            verdicts += [(None, f"grading {out.status}: {out.reason}")] * (len(p.criteria) if p.batched else 1)
        else:
            verdicts += out.judgement if p.batched else [out.judgement]
    status = max(statuses, key=_PRECEDENCE.index)
    reason = f"{len(reasons)} of {len(p.keys)} grading call(s) {status}: {reasons[0]}" if reasons else ""
    return RubricOutcome(_filled(p.criteria, verdicts), status, reason, usage, cost)


def with_rubric(cfg: RewardConfig, item: RewardInput, result: RewardResult, outcome: RubricOutcome | None
                ) -> RewardResult:
    """``result`` with the rubric component, the criteria, the merged judge status, tokens and cost; R is mixed
    again (``RewardConfig.mix``) unless the response is a prompt injection or games the rubric (R = 0)."""
    if outcome is None:
        return result
    result.criteria = outcome.criteria
    score = outcome.score
    if score is not None and "score_dictation" in result.flags:  # self-grading: no grader verdict pays for it
        score = 0.0
        result.reasons["rubric"] = "rubric score zeroed: the answer grades itself"
    if score is not None:
        result.components["rubric"] = score
    if outcome.reason and "rubric" not in result.reasons:
        result.reasons["rubric"] = outcome.reason
    result.flags += [f for f in outcome.flags if f not in result.flags]
    if "rubric_gaming" in result.flags:  # an attempt to manipulate the grader, like a prompt injection: R = 0
        result.reward = 0.0
    elif "prompt_injection" not in result.flags:
        result.reward = cfg.mix(item, result.rule, result.teacher, None, score)
    status = max(result.judge_status, outcome.status, key=_PRECEDENCE.index)
    if status != result.judge_status and status in ("failed", "over_budget"):
        result.flags.append(f"judge_{status}")
    result.judge_status = status
    result.dropped = status == "failed" and cfg.judge.on_failure == "drop"
    result.tokens_in += outcome.usage.tokens_in
    result.tokens_out += outcome.usage.tokens_out
    result.tokens_cache_hit += outcome.usage.tokens_cache_hit
    result.cost_usd += outcome.cost_usd
    return result
