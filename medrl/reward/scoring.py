"""Scoring core (no Ray): rules, then the teacher and the rubric grader (cache first), then the combination into
one RewardResult.

R = the weighted mean of Rule, Teacher, Rubric (and Verifier) over the parts present (``RewardConfig.mix``).
Without any other part (judge disabled, failed, over budget, or skipped) R = Rule. A prompt injection aimed at the
judge forces R = 0 and is never sent to the judge.
"""
from __future__ import annotations

import asyncio
import logging

from medrl.reward.config import RewardConfig
from medrl.reward.judge import Gate, JudgeOutcome, OpenAIJudge, reference_judgement
from medrl.reward.ledger import Usage
from medrl.reward.rubric import DIMENSIONS, Judgement, build_messages, parse_judgement, teacher_score
from medrl.reward.rubric_reward import (Ask, RubricPlan, fixed_outcome, graded, judged_outcome, offline_outcome,
                                        plan, with_rubric)
from medrl.reward.rules import RuleOutcome, detect_injection, evaluate_rules, format_rule
from medrl.reward.store.claims import Claims, GroupCommit
from medrl.reward.store.database import open_store
from medrl.reward.store.schema import judge_key
from medrl.reward.types import RewardInput, RewardResult
from medrl.reward.verifier import Verifier, with_verdict

log = logging.getLogger("medrl.reward")

RULES_MEMO = 16384


def combine(cfg: RewardConfig, item: RewardInput, rules: RuleOutcome, judgement: Judgement | None, status: str,
            judge_reason: str = "", usage: Usage | None = None, cost_usd: float = 0.0) -> RewardResult:
    components = {name: s.score for name, s in rules.scores.items()}
    components["rule"] = rules.rule
    reasons = {name: s.reason for name, s in rules.scores.items()}
    teacher = None
    if judgement is not None:
        # second line of defence: self-grading in the answer zeroes the teacher part, whatever the judge said
        teacher = 0.0 if rules.dictated else teacher_score(judgement, cfg.judge.dimension_weights)
        components["teacher"] = teacher
        components.update({f"judge.{d}": getattr(judgement, d) / 10.0 for d in DIMENSIONS})
        judge_reason = judgement.reason
        if rules.dictated:
            judge_reason = f"teacher score zeroed: the answer grades itself ({judge_reason})"
    if judge_reason:
        reasons["judge"] = judge_reason
    reward = cfg.mix(item, rules.rule, teacher, None, None)
    flags = list(rules.flags)
    if rules.injected:
        reward = 0.0
    dropped = status == "failed" and cfg.judge.on_failure == "drop"
    if status in ("failed", "over_budget"):
        flags.append(f"judge_{status}")
    usage = usage or Usage()
    return RewardResult(id=item.id, reward=reward, rule=rules.rule, teacher=teacher, components=components,
                        reasons=reasons, judge=cfg.judge.judge_id, judge_status=status, dropped=dropped, flags=flags,
                        tokens_in=usage.tokens_in, tokens_out=usage.tokens_out,
                        tokens_cache_hit=usage.tokens_cache_hit, cost_usd=cost_usd)


def _from_cache(record: dict) -> Judgement:
    return Judgement(**{d: record[d] for d in DIMENSIONS}, reason=record["reason"])


def _likert_ask(cfg: RewardConfig, item: RewardInput, answer: str) -> Ask:
    jc = cfg.judge
    return Ask(item.id, lambda: build_messages(item.prompt, answer, item.reference), parse_judgement,
               lambda j: {"judge": jc.judge_id, "rubric_version": jc.rubric_version, **j.scores(), "reason": j.reason,
                          "prompt": item.prompt, "answer": answer, "reference": item.reference},
               _from_cache)


def _shared(outcome: JudgeOutcome) -> JudgeOutcome:
    """The outcome of a sample that waited for another sample's (or another run's) call: it cost nothing."""
    status = "cached" if outcome.status in ("ok", "cached") else outcome.status
    return JudgeOutcome(outcome.judgement, status, outcome.reason)


class Scorer:
    """Scores batches of items; at most ``judge.concurrency`` judge calls in flight; identical judge keys in flight
    at the same time share one call. A key missing from the store is claimed there before its call; a key another
    actor or run has claimed is waited for (its judgement then counts as cached), and taken over if that claim
    expires or is released without a judgement. The store is looked at once more right after the keys are claimed (one
    query for the batch) and before a request that waited for the rate limit is sent."""

    def __init__(self, cfg: RewardConfig, gate: Gate, api_key: str | None = None, store_url: str | None = None):
        self.cfg = cfg
        self.gate = gate
        provider = cfg.judge.provider
        self.cache = open_store(cfg.cache, url=store_url) if provider == "openai" else None
        self.judge = OpenAIJudge(cfg.judge, api_key or "") if provider == "openai" else None
        self._slots = asyncio.Semaphore(cfg.judge.concurrency)
        self._claims = self._commits = None
        if self.cache is not None:
            self._claims = Claims(self.cache, self.cache.get_many, cfg.cache.claim_ttl_s)
            self._commits = GroupCommit(self.cache, self._claims.holder)
        self._rules_memo: dict[tuple, RuleOutcome] = {}
        self._warned_budget = False
        self.verifier = Verifier(cfg, self.judge, self._claims, self._commits, self._slots)  # items weighted 0: none

    @staticmethod
    def _memo_key(item: RewardInput) -> tuple:
        return item.prompt, item.response, item.reference, item.risk, item.expected_behavior, item.rubrics is not None

    def _rules(self, item: RewardInput) -> RuleOutcome:
        """Rule outcomes are pure: the last RULES_MEMO samples seen are not evaluated again (rescoring, GRPO groups
        with identical responses)."""
        key = self._memo_key(item)
        outcome = self._rules_memo.get(key)
        if outcome is None:
            outcome = self._rules_memo[key] = evaluate_rules(item, self.cfg.rules, graded(self.cfg, item))
            if len(self._rules_memo) > RULES_MEMO:
                del self._rules_memo[next(iter(self._rules_memo))]
        return outcome

    def _judge_key(self, item: RewardInput) -> str | None:
        """The item's judge key, or None for a prompt injection (never sent). Cheap: a remembered rule outcome, or
        only the answer split and the injection check, so judge calls start before the full rules run."""
        known = self._rules_memo.get(self._memo_key(item))
        if known is not None:
            return None if known.injected else judge_key(self.cfg, item, known.answer)
        if detect_injection(item.response):
            return None
        return judge_key(self.cfg, item, item.parsed.answer)

    def _rubric_plans(self, items: list[RewardInput]) -> dict[int, RubricPlan]:
        """The rubric plans of the items whose rubric is graded (prompt injections are never graded: R = 0)."""
        plans = {}
        for i, item in enumerate(items):
            if graded(self.cfg, item) and self.cfg.judge.provider != "none" and not detect_injection(item.response):
                fmt = format_rule(item.response, self.cfg.rules.format.no_think_score).score \
                    if self.cfg.rubric.format_gate else 1.0
                plans[i] = plan(self.cfg, item, item.parsed.answer, fmt)
        return plans

    async def score_batch(self, items: list[RewardInput]) -> list[RewardResult]:
        provider = self.cfg.judge.provider if self.cfg.w_teacher > 0 else "none"  # weight 0: no rubric calls
        verdicts = asyncio.ensure_future(self.verifier.verify_batch(items, self.gate))
        plans = self._rubric_plans(items)
        asks: dict[str, Ask] = {}
        keys: list[str | None] = [None] * len(items)
        if provider == "openai":
            keys = [self._judge_key(item) if self.cfg.weights(item).teacher > 0 else None for item in items]
            for item, k in zip(items, keys):
                if k is not None and k not in asks:
                    asks[k] = _likert_ask(self.cfg, item, item.parsed.answer)
        for p in plans.values():
            for k, ask in p.asks.items():
                asks.setdefault(k, ask)
        cached, started, calls = ({}, set(), {})
        if asks:
            cached = self.cache.get_many(asks)
            calls, started = self._claims.start([k for k in asks if k not in cached],
                                                lambda k: self._call(asks[k], k),
                                                lambda k, out: self._put_judgement(asks[k], k, out),
                                                lambda k, record: asks[k].verdict(record))
        outcomes = []
        for n, item in enumerate(items):  # the rules run while the judge calls are in flight
            outcomes.append(self._rules(item))
            if calls and n % 16 == 15:
                await asyncio.sleep(0)
        judged = dict(zip(calls, await asyncio.gather(*calls.values()))) if calls else {}

        def outcome(k: str) -> JudgeOutcome:
            if k in cached:
                return JudgeOutcome(asks[k].verdict(cached[k]), "cached")
            out = judged[k] if k in started else _shared(judged[k])
            started.discard(k)  # later items with the same key share the first one's call
            return out

        results = []
        for i, (it, o, k) in enumerate(zip(items, outcomes, keys)):
            if provider == "none" or self.cfg.weights(it).teacher <= 0:  # an item without a teacher part: no call
                r = combine(self.cfg, it, o, None, "skipped" if o.injected else "disabled")
            elif provider == "reference":
                j = None if o.injected else reference_judgement(o.answer, it.reference, o)
                reason = "" if j or o.injected else "offline judge needs a reference"
                r = combine(self.cfg, it, o, j, "ok" if j else "skipped", reason)
            elif k is None:
                r = combine(self.cfg, it, o, None, "skipped", "prompt injection: not sent to the judge")
            else:
                out = outcome(k)
                r = combine(self.cfg, it, o, out.judgement, out.status, out.reason, out.usage, out.cost_usd)
            p = plans.get(i)
            if p is not None:
                r = with_rubric(self.cfg, it, r, fixed_outcome(p) if p.fixed else offline_outcome(self.cfg, p, o.answer)
                                if self.cfg.judge.provider == "reference" else
                                judged_outcome(p, {key: outcome(key) for key in p.keys}))
            results.append(r)
        results = [with_verdict(self.cfg, it, r, v) for r, v, it in zip(results, await verdicts, items)]
        counts = dict.fromkeys(("judged", "cached", "failed", "over_budget", "skipped", "disabled", "dropped"), 0)
        for r in results:
            counts["judged" if r.judge_status == "ok" else r.judge_status] += 1
            counts["dropped"] += r.dropped
        await self.gate.flush(**counts)
        if counts["failed"]:
            first = next(r for r in results if r.judge_status == "failed")
            log.warning("%d of %d judgements failed in this batch (scored without them%s); first: %s",
                        counts["failed"], len(results), ", dropped" if self.cfg.judge.on_failure == "drop" else "",
                        first.reasons.get("judge") or first.reasons.get("rubric", ""))
        return results

    def _recheck(self, key: str, ask: Ask):
        record = self.cache.get_many([key]).get(key)
        return None if record is None else ask.verdict(record)

    async def _call(self, ask: Ask, key: str) -> JudgeOutcome:
        """Judge one key claimed by this scorer (``Claims`` stores an ok judgement with ``_put_judgement``, or
        releases the claim)."""
        async with self._slots:
            outcome = await self.judge.call(ask.messages(), ask.parse, self.gate,
                                            recheck=lambda: self._recheck(key, ask))
        if outcome.status == "over_budget" and not self._warned_budget:
            self._warned_budget = True
            log.warning("judge budget of $%s reached: rewards fall back to rules only", self.cfg.judge.budget_usd)
        elif outcome.status == "failed":  # one warning per batch (score_batch), each item in the log file
            log.debug("judgement failed for item %s: %s", ask.item_id, outcome.reason)
        return outcome

    async def _put_judgement(self, ask: Ask, key: str, outcome: JudgeOutcome) -> None:
        """Store a judgement (dropping the claim) before its reward is returned, in a group commit with the
        judgements that arrived with it (``GroupCommit``)."""
        usage = outcome.usage
        await self._commits.put({"key": key, **ask.record(outcome.judgement), "tokens_in": usage.tokens_in,
                                 "tokens_out": usage.tokens_out, "tokens_cache_hit": usage.tokens_cache_hit,
                                 "cost_usd": outcome.cost_usd})

    async def close(self) -> None:
        if self._claims is not None:
            await self._claims.close()
        if self.judge is not None:
            await self.judge.close()
        if self.cache is not None:
            self.cache.close()
