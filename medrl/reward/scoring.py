"""Scoring core (no Ray): rules, then the teacher (cache first), then the combination into one RewardResult.

R = w_rule * Rule + w_teacher * Teacher. Without a teacher score (judge disabled, failed, over budget, or skipped)
R = Rule. A prompt injection aimed at the judge forces R = 0 and is never sent to the judge.
"""
from __future__ import annotations

import asyncio
import logging

from medrl.reward.cache import JudgeCache, judge_key
from medrl.reward.config import RewardConfig
from medrl.reward.judge import Gate, JudgeOutcome, OpenAIJudge, reference_judgement
from medrl.reward.ledger import Usage
from medrl.reward.rubric import DIMENSIONS, Judgement, teacher_score
from medrl.reward.rules import RuleOutcome, detect_injection, evaluate_rules
from medrl.reward.text import split_response
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
    reward = cfg.mix(rules.rule, teacher, None)
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


class Scorer:
    """Scores batches of items; at most ``judge.concurrency`` judge calls in flight; identical judge keys in flight
    at the same time share one call."""

    def __init__(self, cfg: RewardConfig, gate: Gate, api_key: str | None = None):
        self.cfg = cfg
        self.gate = gate
        provider = cfg.judge.provider
        self.cache = JudgeCache(cfg.judge.cache_path) if provider == "openai" else None
        self.judge = OpenAIJudge(cfg.judge, api_key or "") if provider == "openai" else None
        self._slots = asyncio.Semaphore(cfg.judge.concurrency)
        self._inflight: dict[str, asyncio.Future] = {}
        self._rules_memo: dict[tuple, RuleOutcome] = {}
        self._warned_budget = False
        self.verifier = Verifier(cfg, self.judge, self.cache) if cfg.w_verifier > 0 else None

    @staticmethod
    def _memo_key(item: RewardInput) -> tuple:
        return item.prompt, item.response, item.reference, item.risk, item.expected_behavior

    def _rules(self, item: RewardInput) -> RuleOutcome:
        """Rule outcomes are pure: the last RULES_MEMO samples seen are not evaluated again (rescoring, GRPO groups
        with identical responses)."""
        key = self._memo_key(item)
        outcome = self._rules_memo.get(key)
        if outcome is None:
            outcome = self._rules_memo[key] = evaluate_rules(item, self.cfg.rules)
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
        return judge_key(self.cfg, item, split_response(item.response).answer)

    async def score_batch(self, items: list[RewardInput]) -> list[RewardResult]:
        provider = self.cfg.judge.provider if self.cfg.w_teacher > 0 else "none"  # weight 0: no rubric calls
        verdicts = asyncio.ensure_future(self.verifier.verify_batch(items, self.gate)) if self.verifier else None
        if provider == "openai":
            keys = [self._judge_key(item) for item in items]
            cached = self.cache.get_many(k for k in keys if k)
            calls = {i: asyncio.ensure_future(self._teacher(item, k)) for i, (item, k) in enumerate(zip(items, keys))
                     if k is not None and k not in cached}
        outcomes = []
        for n, item in enumerate(items):  # the rules run while the judge calls are in flight
            outcomes.append(self._rules(item))
            if provider == "openai" and calls and n % 16 == 15:
                await asyncio.sleep(0)
        if provider == "none":
            results = [combine(self.cfg, it, o, None, "skipped" if o.injected else "disabled")
                       for it, o in zip(items, outcomes)]
        elif provider == "reference":
            results = []
            for it, o in zip(items, outcomes):
                j = None if o.injected else reference_judgement(o.answer, it.reference, o)
                reason = "" if j or o.injected else "offline judge needs a reference"
                results.append(combine(self.cfg, it, o, j, "ok" if j else "skipped", reason))
        else:
            judged = dict(zip(calls, await asyncio.gather(*calls.values())))
            results = []
            for i, (it, o, k) in enumerate(zip(items, outcomes, keys)):
                if k is None:
                    results.append(combine(self.cfg, it, o, None, "skipped", "prompt injection: not sent to the judge"))
                elif k in cached:
                    results.append(combine(self.cfg, it, o, _from_cache(cached[k]), "cached"))
                else:
                    out = judged[i]
                    results.append(combine(self.cfg, it, o, out.judgement, out.status, out.reason, out.usage,
                                           out.cost_usd))
        if verdicts is not None:
            results = [with_verdict(self.cfg, r, v) for r, v in zip(results, await verdicts)]
        counts = dict.fromkeys(("judged", "cached", "failed", "over_budget", "skipped", "disabled", "dropped"), 0)
        for r in results:
            counts["judged" if r.judge_status == "ok" else r.judge_status] += 1
            counts["dropped"] += r.dropped
        await self.gate.flush(**counts)
        if counts["failed"]:
            first = next(r for r in results if r.judge_status == "failed")
            log.warning("%d of %d judgements failed in this batch (scored by rules only); first: %s",
                        counts["failed"], len(results), first.reasons.get("judge", ""))
        return results

    async def _teacher(self, item: RewardInput, key: str) -> JudgeOutcome:
        """Judge one sample not in the cache; a sample whose key is already being judged waits for that call and
        counts as cached (it costs nothing)."""
        if key in self._inflight:
            outcome = await asyncio.shield(self._inflight[key])
            if outcome.status == "ok":
                return JudgeOutcome(outcome.judgement, "cached")
            return JudgeOutcome(outcome.judgement, outcome.status, outcome.reason)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            outcome = await self._call(item, split_response(item.response).answer, key)
            future.set_result(outcome)
        except BaseException as exc:  # cancelled or crashed: waiters get the same error
            future.set_exception(exc)
            raise
        finally:
            del self._inflight[key]
        return outcome

    async def _call(self, item: RewardInput, answer: str, key: str) -> JudgeOutcome:
        async with self._slots:
            outcome = await self.judge.judge(item.prompt, answer, item.reference, self.gate)
        if outcome.status == "ok":
            j = outcome.judgement
            self.cache.put({"key": key, "judge": self.cfg.judge.judge_id,
                            "rubric_version": self.cfg.judge.rubric_version, **j.scores(), "reason": j.reason, "prompt": item.prompt, "answer": answer,
                            "reference": item.reference, "tokens_in": outcome.usage.tokens_in,
                            "tokens_out": outcome.usage.tokens_out,
                            "tokens_cache_hit": outcome.usage.tokens_cache_hit, "cost_usd": outcome.cost_usd})
        elif outcome.status == "over_budget" and not self._warned_budget:
            self._warned_budget = True
            log.warning("judge budget of $%s reached: rewards fall back to rules only", self.cfg.judge.budget_usd)
        elif outcome.status == "failed":  # one warning per batch (score_batch), each item in the log file
            log.debug("judgement failed for item %s: %s", item.id, outcome.reason)
        return outcome

    async def close(self) -> None:
        if self.judge is not None:
            await self.judge.close()
        if self.cache is not None:
            self.cache.close()
