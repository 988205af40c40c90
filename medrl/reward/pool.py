"""Ray shell of the reward plane: judge actors (async, bounded concurrency) and one coordinator actor that holds
the global rate limits, the budget and the usage totals.

Items with the same judged content are routed to the same actor, so they share one judge call; new content goes to
the least-loaded actor.
Ray restarts a dead judge actor and re-runs its unfinished batches; judgements finished before the crash are read
from the judge store, so nothing is lost and nothing already received is paid for again. An actor dead for good
(past ``actor_max_restarts``) is replaced by a fresh one and its items are resubmitted (``collect``, ``score``).
Both ways in end a step the same way: reward-stage metrics and the budget warning (``medrl judge`` and PPO alike).
Judge actors are spread over the cluster's nodes; the coordinator stays on the driver's node. Rate limits and
spending live in the store (``medrl.reward.store.database``), so they hold across pools, processes and restarts.
"""
from __future__ import annotations

import logging
import os
import resource
import uuid
from pathlib import Path

import ray
from pydantic import SecretStr
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from medrl.errors import UsageError
from medrl.ray_utils import quiet_collector
from medrl.reward.config import JudgeConfig, RewardConfig
from medrl.reward.ledger import LeasedGate, Ledger, Settlement, StoreLimits
from medrl.reward.preflight import judge_api_key
from medrl.reward.scoring import Scorer
from medrl.reward.store.database import open_store, store_url
from medrl.reward.types import RewardInput, RewardResult
from medrl.runs import MetricsLogger, RunDir

log = logging.getLogger("medrl.reward")

ROUTES_KEPT = 1 << 16
"""Judged contents whose actor the pool remembers (about 100 bytes each)."""
REWARD_RETRIES = 2
"""Rounds of resubmission of items whose reward task failed (their judge actor died past its restarts)."""
PROBE_TIMEOUT_S = 30.0
"""How long a liveness probe waits for a judge actor (one being restarted by Ray answers once it is back)."""


def process_info() -> dict:
    """pid, Ray node id and CPU seconds used so far by the calling process (fault tests and benchmarks)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
            "cpu_s": usage.ru_utime + usage.ru_stime}


def budget_scope(jc: JudgeConfig, run: RunDir | None) -> str:
    """The spend-ledger row ``budget_usd`` caps: this run directory's, or the shared budget named ``budget_scope``
    (a pool without a run directory has a budget of its own)."""
    if jc.budget_scope != "run":
        return f"shared:{jc.budget_scope}"
    return f"run:{run.root.resolve()}" if run is not None else f"pool:{uuid.uuid4().hex}"


@ray.remote(num_cpus=0)
class JudgeCoordinator:
    """Hosts the pool's Ledger: judge actors lease call permits from it (rate limits, budget) and report usage.
    The rate buckets and the spending of ``budget_scope`` are kept in the judge store."""

    def __init__(self, cfg: RewardConfig, budget_scope: str, store_url: SecretStr | None):
        jc, limits = cfg.judge, None
        if jc.provider == "openai":  # the other judges cost nothing and need no store
            store = open_store(cfg.cache, url=store_url and store_url.get_secret_value())
            limits = StoreLimits(store, f"{jc.base_url}|{jc.model}", jc.rpm, jc.tpm, budget_scope)
        self.ledger = Ledger(jc.rpm, jc.tpm, jc.budget_usd, limits=limits)

    def lease(self, n: int, tokens_each: int, cost_each: float) -> tuple[int, float] | None:
        return self.ledger.lease(n, tokens_each, cost_each)

    def settle(self, settlement: Settlement) -> None:
        self.ledger.settle(settlement)

    def add(self, **counts: int) -> None:
        self.ledger.add(**counts)

    def stats(self) -> dict:
        return self.ledger.stats()

    def process_info(self) -> dict:
        return process_info()


@ray.remote
class JudgeActor:
    def __init__(self, cfg: RewardConfig, api_key: SecretStr | None, coordinator_name: str,
                 store_url: SecretStr | None = None):
        # the coordinator is passed by name: a handle argument would keep the actor from restarting cleanly
        self.cfg, self._api_key, self._coordinator_name = cfg, api_key, coordinator_name
        self._store_url = store_url
        self._scorer: Scorer | None = None

    def _get_scorer(self) -> Scorer:
        if self._scorer is None:  # built inside the actor's event loop
            key = self._api_key.get_secret_value() if self._api_key is not None else None
            coordinator = ray.get_actor(self._coordinator_name)
            # one lease and one usage report per `concurrency` calls: each is a coordinator round trip and a store
            # transaction (~0.8 ms of the coordinator's CPU); at half this size the coordinator took about a tenth of
            # the judge plane's CPU per judged item (bench/scoring.py), now about a twentieth
            lease_size = self.cfg.judge.concurrency
            gate = LeasedGate(coordinator.lease.remote, coordinator.settle.remote, coordinator.add.remote,
                              lease_size=lease_size, flush_every=lease_size)
            url = self._store_url.get_secret_value() if self._store_url is not None else None
            self._scorer = Scorer(self.cfg, gate, key, store_url=url)
        return self._scorer

    async def score_batch(self, items: list[RewardInput]) -> list[RewardResult]:
        return await self._scored(items)

    async def score_items(self, items: list[RewardInput]):
        """One return value per item (called with ``num_returns=len(items)``)."""
        results = await self._scored(items)
        return results[0] if len(results) == 1 else tuple(results)

    async def _scored(self, items: list[RewardInput]) -> list[RewardResult]:
        first = self._scorer is None
        if first:
            quiet_collector(freeze=False)
        results = await self._get_scorer().score_batch(items)
        if first:  # what the first batch loaded (clients, jieba, opencc) lives as long as the actor: not scanned again
            quiet_collector()
        return results

    def process_info(self) -> dict:
        return process_info()

    async def close(self) -> None:
        if self._scorer is not None:
            await self._scorer.close()


def _judge_unusable(exc: ray.exceptions.RayError) -> bool:
    """A reward task that failed because the judge cannot work at all (bad key, unknown model: a ``UsageError``,
    ``JudgeSetupError``): stop the run, never resubmit or replace actors for it."""
    return isinstance(getattr(exc, "cause", None), UsageError)


class RewardPool:
    """Scores RewardInputs with rules + the teacher judge on a pool of Ray actors (Ray must be initialised)."""

    def __init__(self, cfg: RewardConfig, run: RunDir | None = None):
        if not ray.is_initialized():
            raise UsageError("RewardPool needs Ray: call medrl.ray_utils.init_ray(cfg.ray) first")
        jc = cfg.judge
        cache_path = str(Path(cfg.cache.path).expanduser().resolve())
        self.cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"path": cache_path})})
        where = cache_path if cfg.cache.backend == "sqlite" else f"PostgreSQL at ${cfg.cache.url_env}"
        api_key = None
        if jc.provider == "openai":
            api_key = SecretStr(judge_api_key(jc))
        self._api_key = api_key
        # read here and passed as a secret, like the API key: only the driver's node needs it, no job metadata holds it
        url = store_url(cfg.cache) if jc.provider == "openai" else None
        self._db_url = SecretStr(url) if url else None
        self._coordinator_name = f"medrl-judge-coordinator-{uuid.uuid4().hex[:12]}"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.coordinator = JudgeCoordinator.options(name=self._coordinator_name, max_restarts=-1, max_task_retries=-1,
                                                    scheduling_strategy=here).remote(
            self.cfg, budget_scope(jc, run), self._db_url)
        self.actors = [self._new_actor() for _ in range(jc.num_actors)]
        self._routes: dict[int, int] = {}
        self._assigned = [0] * len(self.actors)
        self._metrics = MetricsLogger(run, "reward") if run is not None else None
        self._steps = 0
        self._warned_budget = False
        if jc.provider == "openai":
            log.info("reward pool: judge %s, %d actor(s) x %d concurrent, rpm %s, tpm %s, budget %s, cache %s",
                     jc.judge_id, jc.num_actors, jc.concurrency, jc.rpm or "unlimited", jc.tpm or "unlimited",
                     "none" if jc.budget_usd is None else f"${jc.budget_usd:g} ({jc.budget_scope})", where)
        else:  # no calls, no spending, no cache: say only what is used
            log.info("reward pool: judge %s, %d actor(s)", jc.judge_id, jc.num_actors)
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        if jc.provider == "openai" and cfg.cache.backend == "sqlite" and nodes > 1:
            log.warning("reward.cache.backend=sqlite on a %d-node cluster: judge actors on another node open %s on "
                        "that node's own disk, where judgements, rate limits and budget are not shared with the "
                        "head; use reward.cache.backend=postgres (docs/cluster.md)", nodes, cache_path)

    def patient_access(self) -> dict:
        """What an LLM patient in another actor needs to share this pool's endpoint, ledger and store (secrets as
        ``SecretStr``; ``medrl.consult``)."""
        return {"coordinator": self._coordinator_name, "api_key": self._api_key, "store_url": self._db_url,
                "cache": self.cfg.cache}

    def _new_actor(self):
        jc = self.cfg.judge
        return JudgeActor.options(num_cpus=jc.actor_num_cpus, max_restarts=jc.actor_max_restarts,
                                  max_task_retries=-1, scheduling_strategy="SPREAD").remote(
            self.cfg, self._api_key, self._coordinator_name, self._db_url)

    def replace_dead_actors(self) -> int:
        """Replace every judge actor that is dead for good (past its restarts) by a fresh one, so that retries and
        new content (routed by index) reach a live actor; returns how many were replaced."""
        probes = [a.process_info.remote() for a in self.actors]
        replaced = 0
        for i, probe in enumerate(probes):
            try:
                ray.get(probe, timeout=PROBE_TIMEOUT_S)
            except ray.exceptions.ActorDiedError:
                log.warning("judge actor %d died past its restarts (reward.judge.actor_max_restarts=%d): replaced",
                            i, self.cfg.judge.actor_max_restarts)
                self.actors[i] = self._new_actor()
                replaced += 1
            except ray.exceptions.GetTimeoutError:
                pass  # busy or being restarted: alive
        return replaced

    def _route(self, item: RewardInput) -> int:
        """The actor for ``item``: items with the same judged content (prompt, final answer, reference) go to the
        actor that got it before, so they share one judge call and the judgement in flight; new content goes to the
        actor with the fewest items so far, which keeps the actors evenly loaded."""
        content = hash((item.prompt, item.parsed.answer, item.reference))
        actor = self._routes.pop(content, None)
        if actor is None:
            actor = min(range(len(self.actors)), key=self._assigned.__getitem__)
            if len(self._routes) >= ROUTES_KEPT:
                del self._routes[next(iter(self._routes))]
        self._routes[content] = actor  # re-inserted: the most recently seen content is evicted last
        self._assigned[actor] += 1
        return actor

    def _plan(self, items: list[RewardInput]):
        """(actor, item indices) batches of at most ``batch_size`` items, each yielded as soon as it is full."""
        size = self.cfg.judge.batch_size
        per_actor: list[list[int]] = [[] for _ in self.actors]
        for i, item in enumerate(items):
            actor = self._route(item)
            per_actor[actor].append(i)
            if len(per_actor[actor]) == size:
                yield self.actors[actor], per_actor[actor]
                per_actor[actor] = []
        for actor, idxs in zip(self.actors, per_actor):
            if idxs:
                yield actor, idxs

    def submit(self, items: list[RewardInput]) -> list[ray.ObjectRef]:
        """Non-blocking: one ObjectRef per item, each resolving to its RewardResult. (``score`` is faster for large
        batches: it moves one object per batch instead of one per item.)"""
        refs: list[ray.ObjectRef] = [None] * len(items)  # type: ignore[list-item]
        for actor, idxs in self._plan(items):
            out = actor.score_items.options(num_returns=len(idxs)).remote([items[i] for i in idxs])
            for i, ref in zip(idxs, [out] if len(idxs) == 1 else out):
                refs[i] = ref
        return refs

    def collect(self, items: list[RewardInput], refs: list[ray.ObjectRef]) -> tuple[list[RewardResult], int]:
        """Blocking: the RewardResults of ``submit(items)``'s ``refs``, in order, and how many items had to be
        resubmitted; ends the step as ``score`` does (metrics, budget warning)."""
        results, retries = self._gather(items, list(refs))
        self._log_step()
        return results, retries

    def score(self, items: list[RewardInput], progress: bool = True) -> list[RewardResult]:
        """Blocking: RewardResults in the order of ``items``. Ends the step: per-step metrics, budget warning."""
        pending = {actor.score_batch.remote([items[i] for i in idxs]): idxs for actor, idxs in self._plan(items)}
        results: list[RewardResult] = [None] * len(items)  # type: ignore[list-item]
        failed: list[int] = []
        with tqdm(total=len(items), desc="reward", unit="item", disable=not progress, mininterval=0.5) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                idxs = pending.pop(done[0])
                try:
                    batch = ray.get(done[0])
                except ray.exceptions.RayError as exc:
                    if _judge_unusable(exc):
                        raise
                    log.warning("reward batch of %d item(s) failed (%s)", len(idxs), type(exc).__name__)
                    failed += idxs
                    continue
                for i, result in zip(idxs, batch):
                    results[i] = result
                bar.update(len(idxs))
            if failed:
                self.replace_dead_actors()
                again = [items[i] for i in failed]
                for i, result in zip(failed, self._gather(again, self.submit(again))[0]):
                    results[i] = result
                bar.update(len(failed))
        self._log_step()
        return results

    def _gather(self, items: list[RewardInput], refs: list[ray.ObjectRef]) -> tuple[list[RewardResult], int]:
        """Results of ``refs``; the items whose task failed are resubmitted (after the dead actors are replaced)
        for up to ``REWARD_RETRIES`` rounds. Judgements finished before a crash come from the cache: not repaid."""
        results: list[RewardResult] = [None] * len(items)  # type: ignore[list-item]
        pending, retries = list(range(len(items))), 0
        for attempt in range(REWARD_RETRIES + 1):
            failed = []
            for i in pending:
                try:
                    results[i] = ray.get(refs[i])
                except ray.exceptions.RayError as exc:
                    if attempt == REWARD_RETRIES or _judge_unusable(exc):
                        raise
                    failed.append(i)
                    error = type(exc).__name__
            if not failed:
                break
            log.warning("%d reward task(s) failed (%s): resubmitting (round %d of %d)", len(failed), error,
                        attempt + 1, REWARD_RETRIES)
            self.replace_dead_actors()
            for i, ref in zip(failed, self.submit([items[i] for i in failed])):
                refs[i] = ref
            pending, retries = failed, retries + len(failed)
        return results, retries

    def _log_step(self) -> None:
        stats = self.stats()
        self._steps += 1
        if stats["over_budget"] and not self._warned_budget:
            self._warned_budget = True
            log.warning("judge budget of $%s reached: %d sample(s) scored by rules only",
                        stats["budget_usd"], stats["over_budget"])
        if self._metrics is not None:
            self._metrics.log(self._steps, {k: v for k, v in stats.items() if isinstance(v, (int, float))})

    def stats(self) -> dict:
        """Cumulative totals: requests, http_attempts, judged, cached, failed, over_budget, skipped, disabled,
        dropped, tokens_in/out/cache_hit, cost_usd, budget_usd, budget_spent_usd, budget_left_usd, rate_wait_s."""
        return ray.get(self.coordinator.stats.remote())

    def process_info(self) -> list[dict]:
        """pid and CPU seconds of every judge actor, then of the coordinator."""
        return ray.get([a.process_info.remote() for a in [*self.actors, self.coordinator]])

    def close(self) -> None:
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as exc:  # a dead actor has nothing left to close
            log.debug("closing judge actors: %s", exc)
        for handle in [*self.actors, self.coordinator]:
            ray.kill(handle)
        self.actors = []
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
