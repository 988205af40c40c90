"""Teacher judges: any OpenAI-compatible endpoint (async, via the ``openai`` client) and the offline reference judge.

HTTP retries, timeouts and Retry-After are the openai client's (``max_retries``, ``timeout``). On top of them an
empty or invalid verdict is asked again at most ``malformed_retries`` times, then the judgement fails with a reason.
Every call goes through a gate that enforces the global rate limits and the budget and records usage.

The client runs on openai's aiohttp transport and posts the request body as-is (``client.post``, the client's
documented way to send a request, with ``cast_to=dict``: the response is read as plain JSON, not built into
``ChatCompletion`` models): together they cut the client CPU per call to well under half of
``chat.completions.create`` on httpx, which matters at hundreds of judgements per second.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Protocol

import openai

from medrl.reward.config import JudgeConfig
from medrl.reward.judge_errors import JudgeSetupError, connection_failure, fatal_judge_error
from medrl.reward.ledger import Permit, Usage, call_cost
from medrl.reward.rubric import Judgement, JudgementError, build_messages, parse_judgement
from medrl.reward.rules import RuleOutcome
from medrl.reward.text import en_words, estimate_tokens, key_terms, term_found


@lru_cache(maxsize=8)
def _system_tokens(system: str) -> int:
    """Token estimate of a fixed system prompt (the rubric), computed once per prompt."""
    return estimate_tokens(system)


@dataclass
class JudgeOutcome:
    judgement: Judgement | Any | None
    """A rubric Judgement, or what the ``parse`` of ``OpenAIJudge.call`` returned (the verifier's verdict)."""
    status: str
    """ok | failed | over_budget"""
    reason: str = ""
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0


class Gate(Protocol):
    """Global rate limits + budget + usage ledger shared by every judge (``medrl.reward.ledger.LeasedGate``)."""

    async def reserve(self, tokens: int, cost_usd: float) -> Permit | None:
        """A permit for one call of about ``tokens`` tokens costing at most ``cost_usd``; None: budget spent."""

    def settle(self, permit: Permit, tokens_in: int, tokens_out: int, tokens_cache_hit: int, cost_usd: float,
               http_attempts: int) -> None:
        """Report what the call used (zero tokens for a call that failed) and the HTTP attempts made since the
        previous settle (retries included)."""

    def give_back(self, permit: Permit) -> None:
        """Return a permit that was not used."""

    async def flush(self, **counts: int) -> None:
        """Send pending usage and add per-sample outcome counts (judged, cached, failed, ...)."""


def usage_of(completion: dict) -> Usage:
    """Token usage of a chat completion (JSON); cache hits from DeepSeek's ``prompt_cache_hit_tokens`` or OpenAI's
    ``prompt_tokens_details.cached_tokens``."""
    u = (completion.get("usage") if isinstance(completion, dict) else None) or {}
    hit = u.get("prompt_cache_hit_tokens")
    if hit is None:
        hit = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    return Usage(tokens_in=u.get("prompt_tokens") or 0, tokens_out=u.get("completion_tokens") or 0,
                 tokens_cache_hit=hit or 0)


def content_of(completion: dict) -> str | None:
    """The first choice's message text (None when the response has none, in whatever shape)."""
    try:
        content = completion["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _error_reason(exc: openai.APIError, max_retries: int) -> str:
    """What went wrong with a call: ``connection refused``, ``DNS lookup failed``, ``TLS handshake failed``,
    ``timeout``, ``connection error`` (with the cause) or ``HTTP <status>``, and the client retries made."""
    retried = f"(client retries: {max_retries})"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code} {retried}: {str(exc.message)[:160]}"
    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError included
        failure = connection_failure(exc)
        if failure is not None:
            return f"{failure} {retried}"
        if isinstance(exc, openai.APITimeoutError):
            return f"timeout {retried}"
        cause = exc.__cause__ or exc
        return f"connection error {retried}: {type(cause).__name__}: {str(cause)[:160]}"
    return f"{type(exc).__name__}: {str(exc)[:160]}"


class OpenAIJudge:
    def __init__(self, cfg: JudgeConfig, api_key: str):
        self.cfg = cfg
        self.price = cfg.prices[cfg.model]
        self._key = api_key
        self._attempts = 0
        http = openai.DefaultAioHttpClient(event_hooks={"request": [self._count_attempt]})
        self.client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=api_key, timeout=cfg.timeout_s,
                                         max_retries=cfg.max_retries, http_client=http)

    async def _count_attempt(self, request) -> None:
        self._attempts += 1

    def _take_attempts(self) -> int:
        n, self._attempts = self._attempts, 0
        return n

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    async def judge(self, prompt: str, answer: str, reference: str | None, gate: Gate,
                    recheck: Callable[[], Judgement | None] | None = None) -> JudgeOutcome:
        return await self.call(build_messages(prompt, answer, reference), parse_judgement, gate, recheck)

    async def call(self, messages: list[dict[str, str]], parse: Callable[[str | None], Any], gate: Gate,
                   recheck: Callable[[], Any] | None = None) -> JudgeOutcome:
        """One JSON verdict: ``messages`` (fixed system prompt first) sent under the gate's rate limits and budget;
        ``parse`` turns the reply into the verdict (``JudgeOutcome.judgement``) or raises JudgementError, which is
        asked again at most ``malformed_retries`` times. ``recheck`` (the cache lookup) runs after the rate-limit
        wait, right before the first request is sent: a verdict that arrived meanwhile (another actor or run) is
        returned as ``cached``."""
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens, "response_format": {"type": "json_object"}}
        est_tokens = _system_tokens(messages[0]["content"]) + estimate_tokens(messages[-1]["content"]) \
            + self.cfg.max_tokens
        est_cost = call_cost(Usage(est_tokens - self.cfg.max_tokens, self.cfg.max_tokens), self.price)
        total, cost, reason = Usage(), 0.0, ""
        for attempt in range(1 + self.cfg.malformed_retries):
            permit = await gate.reserve(est_tokens, est_cost)
            if permit is None:
                return JudgeOutcome(None, "over_budget", "budget cap reached", total, cost)
            if permit.wait_s > 0:
                await asyncio.sleep(permit.wait_s)
            found = recheck() if recheck is not None and attempt == 0 else None
            if found is not None:
                gate.give_back(permit)
                return JudgeOutcome(found, "cached")
            try:
                completion = await self.client.post("/chat/completions", body=body, cast_to=dict)
            except openai.APIError as exc:
                gate.settle(permit, 0, 0, 0, 0.0, self._take_attempts())
                fatal = fatal_judge_error(exc, self.cfg)
                if fatal is not None:  # no judgement can succeed: stop, never a per-sample failure
                    raise JudgeSetupError(self._redact(fatal)) from None
                return JudgeOutcome(None, "failed", self._redact(_error_reason(exc, self.cfg.max_retries)),
                                    total, cost)
            usage = usage_of(completion)
            call = call_cost(usage, self.price)
            gate.settle(permit, usage.tokens_in, usage.tokens_out, usage.tokens_cache_hit, call,
                        self._take_attempts())
            total.add(usage)
            cost += call
            content = content_of(completion)
            try:
                return JudgeOutcome(parse(content), "ok", "", total, cost)
            except JudgementError as exc:
                reason = str(exc)
        calls = 1 + self.cfg.malformed_retries
        return JudgeOutcome(None, "failed", f"{reason} ({calls} call{'s' if calls > 1 else ''})", total, cost)

    async def close(self) -> None:
        await self.client.close()


def reference_judgement(answer: str, reference: str | None, rules: RuleOutcome) -> Judgement | None:
    """The offline judge (``provider: reference``), deterministic. accuracy = 10 x share of the reference's key
    terms in the answer; completeness = 10 x share of reference sentences with at least half of their terms
    present; safety = 10 x the safety rule; clarity = 10 x the length rule. None without a reference."""
    if not reference or not reference.strip():
        return None
    if rules.covered_answer is not None:  # keyword lists do not count (rules.keyword_rule)
        answer = rules.covered_answer
    words = en_words(answer)
    terms = key_terms(reference, 64)
    if terms:
        accuracy = sum(term_found(t, answer, words) for t in terms) / len(terms)
    else:
        accuracy = float(reference.strip().lower() in answer.lower())
    sentences = [s for s in re.split(r"[.。;；!?！？\n]+", reference) if key_terms(s, 64)]
    complete = [sum(term_found(t, answer, words) for t in key_terms(s, 64)) * 2 >= len(key_terms(s, 64))
                for s in sentences]
    completeness = sum(complete) / len(complete) if complete else accuracy
    return Judgement(accuracy=round(10 * accuracy), safety=round(10 * rules.scores["safety"].score),
                     completeness=round(10 * completeness), clarity=round(10 * rules.scores["length"].score),
                     reason=f"offline comparison with the reference: {sum(complete)}/{len(complete)} sentences covered")
