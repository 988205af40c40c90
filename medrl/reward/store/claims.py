"""Claims on judge store keys (pure core, no Ray): every paid call (rubric judgements, pairwise verdicts, generated
rubrics) goes through ``Claims``, so no key is paid for twice, by concurrent coroutines, actors, processes or runs.

A key's value is taken from the store when it is there; else the key is claimed (one query for a batch of keys) and
its call made, and the result stored (dropping the claim) before it is returned; a failed call releases the claim so
another holder may try. A key another holder has claimed is waited for (one lookup per poll for every waited key):
its value counts as cached, and the key is taken over when that claim expires or is released without a value. The
holder's claims are renewed every ``ttl_s / 3`` while it holds any, and ``close`` releases what is left.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Awaitable, Callable, Iterable

from medrl.reward.judge import JudgeOutcome

log = logging.getLogger("medrl.reward")

CLAIM_POLL_S = 0.25
"""How often keys claimed by another holder are looked up while this one waits for their values."""

Call = Callable[[str], Awaitable[JudgeOutcome]]
"""Makes the paid call of a key this holder has claimed (``OpenAIJudge.call``: status ok, cached, failed...)."""
Put = Callable[[str, JudgeOutcome], Awaitable[None]]
"""Stores an ok outcome of a key with ``Claims.holder``, which drops the claim, committed before it returns."""
Verdict = Callable[[str, Any], Any]
"""The judgement of a key from its stored value (what the table's lookup returns for it)."""


def _stored_as_is(key: str, value: Any) -> Any:
    return value


class Claims:
    """One holder's claims on keys of one store table. ``lookup(keys)`` returns ``{key: stored value}`` of the keys
    in the table (``JudgeStore.rubrics_many``...). Use from one event loop; ``close`` when done."""

    def __init__(self, store, lookup: Callable[[list[str]], dict], ttl_s: float, poll_s: float = CLAIM_POLL_S):
        self.store, self.lookup, self.ttl_s, self.poll_s = store, lookup, ttl_s, poll_s
        self.holder = uuid.uuid4().hex  # this holder's name on its claims
        self._inflight: dict[str, asyncio.Future] = {}  # keys being resolved here -> their outcome
        self._tasks: set[asyncio.Task] = set()
        self._waiting: dict[str, asyncio.Future] = {}  # keys claimed by others -> their value, or None once ours
        self._poller: asyncio.Task | None = None
        self._renewer: asyncio.Task | None = None

    async def get(self, keys: Iterable[str], call: Call, put: Put,
                  verdict: Verdict = _stored_as_is) -> dict[str, JudgeOutcome]:
        """``{key: outcome}`` of the distinct ``keys``: stored ones and ones another holder stored while this one
        waited are ``cached`` (their judgement ``verdict(key, value)``), the others ``call``'s outcome."""
        keys = list(dict.fromkeys(keys))
        found = self.lookup(keys) if keys else {}
        out = {k: JudgeOutcome(verdict(k, v), "cached") for k, v in found.items()}
        futures, _ = self.start([k for k in keys if k not in found], call, put, verdict)
        out.update(zip(futures, await asyncio.gather(*futures.values())))
        return {k: out[k] for k in keys}

    def start(self, keys: Iterable[str], call: Call, put: Put,
              verdict: Verdict = _stored_as_is) -> tuple[dict[str, Awaitable[JudgeOutcome]], set[str]]:
        """Start resolving ``keys`` (known to be missing from the store) as ``get`` does, without waiting: returns
        each key's outcome (shielded: a cancelled waiter cancels nothing), and the keys started here now (keys
        already in flight here share that call). Those not in flight yet are claimed in one query."""
        keys = list(dict.fromkeys(keys))
        fresh = [k for k in keys if k not in self._inflight]
        mine = self.store.claim_many(fresh, self.holder, self.ttl_s) if fresh else set()
        self._keep_renewing(mine)
        for k in fresh:
            future = self._inflight[k] = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._resolve(k, k in mine, future, call, put, verdict))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # the future carries the error
        return {k: asyncio.shield(self._inflight[k]) for k in keys}, set(fresh)

    async def _resolve(self, key: str, claimed: bool, future: asyncio.Future, call: Call, put: Put,
                       verdict: Verdict) -> None:
        try:
            if not claimed:
                value = await self._wait_for_other(key)  # None: the key is ours now
                if value is not None:
                    future.set_result(JudgeOutcome(verdict(key, value), "cached"))
                    return
            future.set_result(await self._own(key, call, put))
        except BaseException as exc:  # cancelled or crashed: waiters get the same error
            future.set_exception(exc)
            raise
        finally:
            del self._inflight[key]

    async def _own(self, key: str, call: Call, put: Put) -> JudgeOutcome:
        """Call for a key this holder has claimed; an ok outcome is stored (dropping the claim) before it is
        returned, otherwise the claim is released so another holder may try."""
        outcome = None
        try:
            outcome = await call(key)
        finally:
            if outcome is None or outcome.status != "ok":
                self.store.release([key], self.holder)
        if outcome.status == "ok":
            await put(key, outcome)
        return outcome

    async def _wait_for_other(self, key: str):
        """Wait until the key's value is in the store (returned) or the key is claimed by this holder (None)."""
        future = self._waiting[key] = asyncio.get_running_loop().create_future()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll_claimed())
        return await future

    async def _poll_claimed(self) -> None:
        """One lookup per poll for every waited key: found values resolve their waiters, then the keys whose claim
        expired or was released are claimed for this holder."""
        while self._waiting:
            await asyncio.sleep(self.poll_s)
            waiting = list(self._waiting)
            try:
                found = self.lookup(waiting)
                rest = [k for k in waiting if k not in found]
                mine = self.store.claim_many(rest, self.holder, self.ttl_s) if rest else set()
            except Exception as exc:  # the store failed: the waiters fail with it instead of waiting forever
                for k in waiting:
                    self._waiting.pop(k).set_exception(exc)
                raise
            self._keep_renewing(mine)
            for k in waiting:
                if k in found or k in mine:
                    future = self._waiting.pop(k)
                    if not future.done():
                        future.set_result(found.get(k))

    def _keep_renewing(self, claimed: set[str]) -> None:
        """Start the heartbeat that renews this holder's claims (once, at its first claim)."""
        if claimed and self._renewer is None:
            self._renewer = asyncio.ensure_future(self._renew_claims())

    async def _renew_claims(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                self.store.renew_claims(self.holder, self.ttl_s)
            except Exception as exc:  # a missed renewal only lets another holder take a key over: keep going
                log.warning("could not renew claims in %s: %s", self.store.where, exc)

    async def close(self) -> None:
        """Stop the heartbeat and the poller, cancel the calls still running and release their keys."""
        left = list(self._inflight)
        for task in (self._poller, self._renewer, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if left:
            self.store.release(left, self.holder)


class GroupCommit:
    """Group commit of ``holder``'s judgements, for coroutines of one event loop: ``put`` queues a record and returns
    once the transaction holding it has committed (it raises if that transaction failed), so a reward is never
    returned before its judgement is stored. Records queued while the loop runs the callbacks that are ready
    (judge responses that arrived together) share one transaction (``JudgeStore.put_many``): one WAL flush instead of
    one per key."""

    def __init__(self, store, holder: str):
        self.store, self.holder = store, holder
        self._queued: list[tuple[dict, asyncio.Future]] = []

    async def put(self, record: dict) -> None:
        loop = asyncio.get_running_loop()
        if not self._queued:
            loop.call_soon(self._commit)  # after the callbacks ready now, which may queue more records
        done = loop.create_future()
        self._queued.append((record, done))
        await done

    def _commit(self) -> None:
        queued, self._queued = self._queued, []
        try:
            self.store.put_many([record for record, _ in queued], self.holder)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the store's error
            for _, done in queued:
                if not done.done():
                    done.set_exception(exc)
            return
        for _, done in queued:
            if not done.done():
                done.set_result(None)
