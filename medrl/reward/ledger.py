"""The judge ledger: global rate limits (requests and tokens per minute), the budget cap and usage totals (pure).

One ``Ledger`` lives in the pool's coordinator actor; its rate buckets and spending live in the judge store
(``StoreLimits``), so they hold across every process and run on that store. Each judge actor talks to it through a
``LeasedGate``: it leases a few call permits at a time (only as many as the rate limits allow right now, at least
one) and reports usage in bulk, so the global limits hold while the coordinator sees one message per lease instead of
two per call. A permit reserves the call's worst-case cost (estimated prompt + ``max_tokens`` completion), so spent
money plus the calls in flight never pass the budget. What the rate limits cost (``RateWaitMeter``) is reported from
the ledger's totals, with a warning when they bind.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

from medrl.reward.config import JudgeConfig, Price

log = logging.getLogger("medrl.reward")


@dataclass
class Usage:
    """Tokens of one or more judge calls."""

    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cache_hit: int = 0

    def add(self, other: "Usage") -> None:
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.tokens_cache_hit += other.tokens_cache_hit


def call_cost(usage: Usage, price: Price) -> float:
    """USD of ``usage`` at ``price`` (cache-hit prompt tokens at the cache-hit price)."""
    miss = max(0, usage.tokens_in - usage.tokens_cache_hit)
    return (miss * price.input + usage.tokens_cache_hit * price.input_cache_hit + usage.tokens_out * price.output) / 1e6


COUNTERS = ("requests", "http_attempts", "judged", "cached", "failed", "over_budget", "skipped", "disabled",
            "dropped", "tokens_in", "tokens_out", "tokens_cache_hit")


class RateBucket:
    """Reservation-style token bucket (GCRA): ``per_minute`` units per minute, bursts of one second's worth (at least
    one unit). ``reserve`` books units at once and returns how long the caller must wait before using them."""

    def __init__(self, per_minute: int):
        self.interval = 60.0 / per_minute
        self.burst = max(1.0, per_minute / 60.0) * self.interval
        self.tat = 0.0

    def available(self, now: float) -> float:
        """Units that can be used right now without waiting."""
        return (now - max(self.tat, now - self.burst)) / self.interval

    def reserve(self, units: float, now: float) -> float:
        self.tat = max(self.tat, now - self.burst) + units * self.interval
        return max(0.0, self.tat - now)

    def adjust(self, units: float) -> None:
        """Correct earlier reservations by ``units`` (negative: give back)."""
        self.tat += units * self.interval


def lease_buckets(buckets: list[tuple[RateBucket, int]], n: int, now: float) -> tuple[int, float]:
    """Book up to ``n`` calls on every (bucket, units per call): as many as all buckets allow now, or one with a
    wait. Returns (calls, seconds to wait)."""
    for bucket, units in buckets:
        if units > 0:
            n = min(n, max(1, math.floor(bucket.available(now) / units)))
    wait = 0.0
    for bucket, units in buckets:
        wait = max(wait, bucket.reserve(n * units, now))
    return n, wait


class LocalLimits:
    """Rate buckets and spending held in this process (one pool; the pairwise judge of ``medrl eval``)."""

    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float] = time.monotonic):
        self.requests = RateBucket(rpm) if rpm > 0 else None
        self.tokens = RateBucket(tpm) if tpm > 0 else None
        self.clock = clock
        self.spent_usd = 0.0

    def lease(self, n: int, tokens_each: int) -> tuple[int, float]:
        buckets = [(b, u) for b, u in ((self.requests, 1), (self.tokens, tokens_each)) if b is not None]
        return lease_buckets(buckets, n, self.clock())

    def settle(self, usd: float, requests: int, tokens: int) -> None:
        """``usd`` spent; the rate buckets corrected by ``requests`` and ``tokens`` (negative: give back)."""
        self.spent_usd += usd
        for bucket, units in ((self.requests, requests), (self.tokens, tokens)):
            if bucket is not None:
                bucket.adjust(units)

    def spent(self) -> float:
        return self.spent_usd


class StoreLimits:
    """Rate buckets and spending kept in the judge store (``medrl.reward.store.database.JudgeStore``): the limits
    hold over every process and run on that store, and the spending of ``scope`` survives restarts."""

    def __init__(self, store, rate_key: str, rpm: int, tpm: int, scope: str):
        self.store, self.scope = store, scope
        self.limits = [(f"{rate_key}|{kind}", per_minute) for kind, per_minute in (("requests", rpm), ("tokens", tpm))]

    def lease(self, n: int, tokens_each: int) -> tuple[int, float]:
        wanted = [(name, pm, units) for (name, pm), units in zip(self.limits, (1, tokens_each)) if pm > 0]
        return self.store.rate_lease(wanted, n) if wanted else (n, 0.0)

    def settle(self, usd: float, requests: int, tokens: int) -> None:
        """``usd`` spent; the rate buckets corrected by ``requests`` and ``tokens``: one store transaction."""
        moves = [(name, pm, units) for (name, pm), units in zip(self.limits, (requests, tokens)) if pm > 0 and units]
        self.store.settle_usage(self.scope, usd, moves)

    def spent(self) -> float:
        return self.store.spent(self.scope)


@dataclass
class Settlement:
    """What a judge actor reports to the ledger in one message: its finished calls and returned permits, what was
    reserved for them and what they used."""

    calls: int = 0
    """Judge calls that finished (ok or failed) since the last report."""
    unused: int = 0
    """Permits given back unused (the judgement turned up in the store, or the lease was returned at a flush)."""
    reserved_tokens: int = 0
    """Tokens the calls' and the returned permits' leases reserved against the token rate limit."""
    reserved_cost: float = 0.0
    """USD the calls' and the returned permits' leases reserved against the budget."""
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cache_hit: int = 0
    cost_usd: float = 0.0
    """What the calls cost (the provider's usage at ``reward.judge.price``)."""
    http_attempts: int = 0
    """HTTP requests sent, retries included."""

    def empty(self) -> bool:
        return self == Settlement()


class Ledger:
    """The budget, the rate limits (through ``limits``: local or in the store) and the usage totals of one pool.
    ``spent_usd`` is this pool's spending; the budget is checked against the spending of the limits' scope."""

    def __init__(self, rpm: int, tpm: int, budget_usd: float | None, clock: Callable[[], float] = time.monotonic,
                 limits: LocalLimits | StoreLimits | None = None):
        self.limits = limits if limits is not None else LocalLimits(rpm, tpm, clock)
        self.budget_usd = budget_usd
        self.spent_usd = 0.0
        self.reserved_usd = 0.0
        self.rate_wait_s = 0.0
        self.rate_wait_call_s = 0.0  # summed over calls: what the rate limits cost the judge actors
        self.rate_limited_calls = 0
        self.counts = dict.fromkeys(COUNTERS, 0)

    def lease(self, n: int, tokens_each: int, cost_each: float) -> tuple[int, float] | None:
        """Grant up to ``n`` call permits of ``tokens_each`` tokens and ``cost_each`` USD each: as many as the rate
        limits allow now, or one with a wait. Returns (permits, seconds to wait) or None when the budget is spent."""
        if self.budget_usd is not None:
            room = self.budget_usd - self.limits.spent() - self.reserved_usd
            n = min(n, math.floor(room / cost_each) if cost_each > 0 else n)
            if n <= 0:
                return None
        n, wait = self.limits.lease(n, tokens_each)
        self.reserved_usd += n * cost_each
        self.rate_wait_s += wait
        if wait > 0:
            self.rate_wait_call_s += n * wait
            self.rate_limited_calls += n
        return n, wait

    def settle(self, s: Settlement) -> None:
        """Close the reservations of ``s.calls`` finished calls and ``s.unused`` returned permits with what was
        used."""
        self.reserved_usd = max(0.0, self.reserved_usd - s.reserved_cost)
        self.spent_usd += s.cost_usd
        self.limits.settle(s.cost_usd, -s.unused, s.tokens_in + s.tokens_out - s.reserved_tokens)
        self.add(requests=s.calls, http_attempts=s.http_attempts, tokens_in=s.tokens_in, tokens_out=s.tokens_out,
                 tokens_cache_hit=s.tokens_cache_hit)

    def add(self, **deltas: int) -> None:
        for k, v in deltas.items():
            self.counts[k] += v

    def stats(self) -> dict:
        spent = self.limits.spent()
        left = None if self.budget_usd is None else max(0.0, self.budget_usd - spent)
        return {**self.counts, "cost_usd": round(self.spent_usd, 6), "budget_usd": self.budget_usd,
                "budget_spent_usd": round(spent, 6), "budget_left_usd": None if left is None else round(left, 6),
                "rate_wait_s": round(self.rate_wait_s, 3), "rate_wait_call_s": round(self.rate_wait_call_s, 3),
                "rate_limited_calls": self.rate_limited_calls}


@dataclass(frozen=True)
class Permit:
    """One judge call's right to go: wait ``wait_s`` first; ``tokens``/``cost_usd`` were reserved for it."""

    wait_s: float
    tokens: int
    cost_usd: float


class LeasedGate:
    """A judge actor's side of the ledger. ``lease``/``settle``/``add`` reach the coordinator (awaitables).
    A new lease is asked for in the background when half of the permits are used, so calls do not wait for the
    coordinator's round trip; usage is sent every ``flush_every`` calls and on ``flush`` (end of a batch, which also
    returns unused permits)."""

    def __init__(self, lease: Callable[..., Awaitable], settle: Callable[..., Awaitable],
                 add: Callable[..., Awaitable], lease_size: int, flush_every: int):
        self._lease, self._settle, self._add = lease, settle, add
        self.lease_size, self.flush_every = lease_size, flush_every
        self._leases: deque[list] = deque()  # [permits left, ready at, tokens each, cost each], oldest first
        self._permits = 0
        self._largest = (0, 0.0)  # the largest call seen (tokens, cost): what each leased permit reserves
        self._refill: asyncio.Future | None = None
        self._usage = Settlement()
        self._sending: set[asyncio.Task] = set()  # fire-and-forget reports, kept alive until done

    async def reserve(self, tokens: int, cost_usd: float) -> Permit | None:
        while self._permits == 0:
            self._start_refill(tokens, cost_usd)
            if not await asyncio.shield(self._refill):
                return None
        lease = self._leases[0]
        lease[0] -= 1
        if lease[0] == 0:
            self._leases.popleft()
        self._permits -= 1
        if self._permits * 2 <= self.lease_size:
            self._start_refill(tokens, cost_usd)
        return Permit(max(0.0, lease[1] - time.monotonic()), lease[2], lease[3])

    def _start_refill(self, tokens: int, cost_usd: float) -> None:
        if self._refill is None:
            self._refill = asyncio.ensure_future(self._lease_more(tokens, cost_usd))
            # a failed background lease is not lost: the next caller that runs out of permits leases again
            self._refill.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _lease_more(self, tokens: int, cost_usd: float) -> bool:
        try:
            self._largest = tokens, cost_usd = max(tokens, self._largest[0]), max(cost_usd, self._largest[1])
            granted = await self._lease(self.lease_size, tokens, cost_usd)
            if granted is None:
                return False
            self._leases.append([granted[0], time.monotonic() + granted[1], tokens, cost_usd])
            self._permits += granted[0]
            return True
        finally:
            self._refill = None

    def give_back(self, permit: Permit) -> None:
        """Return a permit that was not used (the judgement turned up in the cache while it waited)."""
        u = self._usage
        u.unused += 1
        u.reserved_tokens += permit.tokens
        u.reserved_cost += permit.cost_usd

    def settle(self, permit: Permit, tokens_in: int, tokens_out: int, tokens_cache_hit: int, cost_usd: float,
               http_attempts: int) -> None:
        u = self._usage
        u.calls += 1
        u.reserved_tokens += permit.tokens
        u.reserved_cost += permit.cost_usd
        u.tokens_in += tokens_in
        u.tokens_out += tokens_out
        u.tokens_cache_hit += tokens_cache_hit
        u.cost_usd += cost_usd
        u.http_attempts += http_attempts
        if u.calls >= self.flush_every:
            task = asyncio.ensure_future(self._send())
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        """A background report ended; one that failed (the coordinator or its store is gone) is one warning line."""
        self._sending.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            error = getattr(error, "cause", None) or error  # raised in the coordinator: without Ray's traceback
            log.warning("judge usage not reported: %s", str(error).strip().splitlines()[0])

    def _take(self, return_permits: bool) -> Settlement | None:
        u = self._usage
        if return_permits:
            for left, _, tokens, cost in self._leases:
                u.unused += left
                u.reserved_tokens += left * tokens
                u.reserved_cost += left * cost
            self._leases.clear()
            self._permits = 0
        if u.empty():
            return None
        self._usage = Settlement()
        return u

    async def _send(self, return_permits: bool = False) -> None:
        usage = self._take(return_permits)
        if usage is not None:
            await self._settle(usage)

    async def flush(self, **counts: int) -> None:
        """Send pending usage, return unused permits and add per-sample outcome counts (awaited)."""
        await self._send(return_permits=True)
        if counts:
            await self._add(**counts)


def local_gate(ledger: Ledger, lease_size: int) -> LeasedGate:
    """A gate over a ledger held in this process (no coordinator actor): the pairwise judge, the demo."""
    async def lease(*args):
        return ledger.lease(*args)

    async def settle(settlement: Settlement):
        ledger.settle(settlement)

    async def add(**counts):
        ledger.add(**counts)

    return LeasedGate(lease, settle, add, lease_size=lease_size, flush_every=lease_size)


BINDS_SHARE = 0.1
"""The limit binds when calls waited on it, summed, for more than this share of the elapsed time."""


def warn_if_rate_limit_binds(jc: JudgeConfig, wait_call_s: float, limited_calls: int, seconds: float) -> bool:
    """Warn when the limits held judge calls back for more than a tenth of the elapsed time (summed over calls):
    throughput is then set by the limit, not by the provider."""
    if limited_calls == 0 or wait_call_s <= BINDS_SHARE * max(seconds, 1e-9):
        return False
    log.warning("the judge rate limit binds: %d calls waited %.0f s in all (%.2f s each) over %.1f s "
                "(reward.judge.rpm=%s, tpm=%s); raise them if your provider allows more", limited_calls, wait_call_s,
                wait_call_s / limited_calls, seconds, jc.rpm or "unlimited", jc.tpm or "unlimited")
    return True


class RateWaitMeter:
    """Per-step rate-limit waits from the pool's cumulative ledger stats; warns the first time the limit binds."""

    def __init__(self, jc: JudgeConfig):
        self.jc, self._total, self._calls, self._warned = jc, 0.0, 0, False

    def step(self, stats: dict, seconds: float) -> float:
        """Call-seconds waited since the previous call (``stats``: the pool's ``stats()``)."""
        total, calls = stats.get("rate_wait_call_s", 0.0), stats.get("rate_limited_calls", 0)
        wait, limited = total - self._total, calls - self._calls
        self._total, self._calls = total, calls
        if not self._warned:
            self._warned = warn_if_rate_limit_binds(self.jc, wait, limited, seconds)
        return wait
