"""The Ray shell of PPO: the actor groups the driver talks to, and all the Ray it needs.

``LearnerGroup``: ``ppo.learner.ranks`` ``Learner`` actors forming one torch process group. It owns their placement
group (``PACK``: across nodes when one cannot hold them) and rendezvous (at rank 0's node address), the calls every
rank must make together (a collective on one rank alone hangs), and the sharding of each batch across ranks
(``Batch.shard_rows``: equal row counts, balanced tokens; the ranks get the tensors only, ``Batch.for_learner``, and
their experience comes back as the four token fields they computed, ``Batch.put_rows``).

``RolloutGroup``: ``ppo.rollout.num_actors`` rollout engine actors, restarted by Ray when they die. It owns the
dispatch of rollout micro-batches (chunk ``c`` goes to actor ``c % num_actors``) and tracks each actor's pid to
count restarts. The engine class is a parameter (``rollout_engine``: ``RolloutWorker``, HF generate, for
``ppo.rollout.engine: hf``; ``VLLMRolloutWorker`` for ``vllm``); an engine is any class with this contract:

  ``Engine(*engine_args)``  constructed inside the actor; it starts with the initial adapter (or a fresh LoRA of the
      learner's shape) and its adapter version is -1.
  ``generate(prompts, n, seed, adapter, version) -> dict``
      ``prompts``: ``list[(prompt_index, prompt_text)]``, one rollout micro-batch, the text already rendered with the
      chat template; ``n``: samples per prompt; ``seed``: the sampling seed of this micro-batch (derived from run
      seed, step and chunk index: the same call gives the same samples, also when redone after a restart);
      ``adapter``: ``[ObjectRef]`` of the LoRA state dict (``get_peft_model_state_dict`` keys) of ``version``, in a
      list so that Ray does not fetch it unless the engine must load it (``version`` differs from the one it holds:
      after a publish, or after Ray restarted it with its initial adapter).
      Returns ``{"samples": list[Sample], "reloaded": bool, "pid": int, "generate_s": float}``:
      ``len(prompts) * n`` ``medrl.ppo.batch.Sample``s, ``sample_index`` ``i % n`` of prompt ``i // n``, each with
      its prompt and response token ids, text, whether it finished, and the engine's own log-probs of the response
      tokens at the sampling temperature, as it drew them (the driver compares them with the learner's every step);
      ``pid`` of the engine process; seconds spent sampling.
  ``consult(items, n, seed, adapter, version, spec) -> dict`` (with ``consult.cases_per_step``: ``ConsultingWorker``,
      ``VLLMConsultingWorker`` of ``medrl.ppo.consult_rollout``) as ``generate`` for ``(prompt_index, Case)`` items:
      dialogues played turn by turn, each sample with its ``policy_mask`` and ``dialogue``.
  ``pid() -> int``  the engine process's pid (a restarted actor has a new one).
  ``sleep() -> float`` (engines with a sleep mode; called for ``vllm`` with ``rollout.vllm.sleep`` and sync
      rollouts) free the engine's GPU memory until the next ``generate``; returns the seconds it took.

``ActorGroups`` bundles both groups with the reward pool and is the driver's only door to Ray: waiting on calls in
flight and collecting rewards (``RewardPool.collect``: failed reward tasks resubmitted, dead judge actors replaced).
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import ray
import torch

from medrl.config import Config
from medrl.errors import UsageError
from medrl.ppo.batch import Batch
from medrl.ppo.config import RolloutSettings
from medrl.ppo.consult_rollout import ConsultingWorker, VLLMConsultingWorker
from medrl.ppo.learner import Learner, read_deepspeed_config
from medrl.ppo.preflight import check_actor_resources
from medrl.ppo.rollout import RolloutWorker
from medrl.ppo.vllm_rollout import VLLMRolloutWorker
from medrl.reward.pool import RewardPool
from medrl.reward.types import RewardInput, RewardResult
from medrl.runs import RunDir

log = logging.getLogger("medrl.ppo")

@dataclass
class Pending:
    """Calls in flight on a group: wait on ``refs``; ``result()`` gets them and combines their answers."""

    refs: list
    combine: Callable[[list], Any]

    def result(self) -> Any:
        return self.combine(ray.get(self.refs))


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LearnerActor(Learner):
    """A ``Learner`` with what only a Ray actor can tell: where it runs."""

    def node(self) -> dict:
        """This rank's Ray node (id, address) and a TCP port free on that address: rank 0's is the rendezvous."""
        address = ray.util.get_node_ip_address()
        return {"node_id": ray.get_runtime_context().get_node_id(), "address": address, "port": free_port(address)}


def check_learner_layout(ranks: int, num_cpus: float, num_gpus: float) -> None:
    """Refuse, with one line, learner ranks that the cluster's nodes cannot hold: a rank's bundle (``num_cpus``
    CPUs, ``num_gpus`` GPUs) must fit on one node, and the ranks together on the nodes (their total resources)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    def fits(res: dict) -> int:
        per = [res.get("CPU", 0.0) / num_cpus] + ([res.get("GPU", 0.0) / num_gpus] if num_gpus else [])
        return int(min(per) + 1e-9)

    held = [fits(r) for r in nodes]
    if sum(held) < ranks:
        gpu = f" + {num_gpus:g} GPU" if num_gpus else ""
        raise UsageError(f"ppo.learner.ranks={ranks} ranks of {num_cpus:g} CPU{gpu} each do not fit the Ray "
                         f"cluster: its {len(nodes)} node(s) hold {' + '.join(map(str, held)) or '0'} = {sum(held)}; "
                         f"lower ppo.learner.ranks or ppo.learner.num_cpus/num_gpus, or add nodes")


class LearnerGroup:
    def __init__(self, cfg: Config, init_adapter: str | None, num_gpus: float):
        self.cfg = cfg
        self.actors: list = []
        self._placement = None
        try:
            self.info = self._place_and_rendezvous(init_adapter, num_gpus)
        except BaseException:
            self.close()
            raise
        log.info("learner: %d rank(s), %s, %d trainable parameters", len(self.actors),
                 self.info[0]["distributed_type"], self.info[0]["trainable_params"])

    def _place_and_rendezvous(self, init_adapter: str | None, num_gpus: float) -> list[dict]:
        """One bundle per rank, ``PACK``: on as few nodes as can hold them, across nodes when one cannot (a layout no
        set of nodes can hold is refused first, with one line). The process group meets at rank 0's node address on
        a port free there. Returns each rank's ``setup`` facts, with its node."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lc = self.cfg.ppo.learner
        check_learner_layout(lc.ranks, lc.num_cpus, num_gpus)
        ds_config = read_deepspeed_config(lc.deepspeed)
        bundle = {"CPU": lc.num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self._placement = placement_group([bundle] * lc.ranks, strategy="PACK")
        ray.get(self._placement.ready(), timeout=300)
        actor_cls = ray.remote(LearnerActor)
        self.actors = [
            actor_cls.options(num_cpus=lc.num_cpus, num_gpus=num_gpus,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement, rank))
            .remote(self.cfg, rank, lc.ranks, init_adapter, ds_config) for rank in range(lc.ranks)]
        nodes = ray.get([a.node.remote() for a in self.actors])
        master = nodes[0]
        local = [sum(n["node_id"] == node["node_id"] for n in nodes[:rank]) for rank, node in enumerate(nodes)]
        infos = ray.get([a.setup.remote(master["address"], master["port"], local_rank)
                         for a, local_rank in zip(self.actors, local)])
        return [{**info, "node_id": node["node_id"], "address": node["address"]} for info, node in zip(infos, nodes)]

    def _on_every_rank(self, method: str, *args) -> list:
        return [getattr(a, method).remote(*args) for a in self.actors]

    def _on_shards(self, method: str, batch: Batch, *args) -> tuple[list, list[torch.Tensor]]:
        """``method`` on every rank with its shard of ``batch`` (``Batch.shard_rows``); the calls and the shards' rows."""
        rows = batch.shard_rows(len(self.actors))
        return [getattr(a, method).remote(batch.take(r).for_learner(), *args) for a, r in zip(self.actors, rows)], rows

    def make_experience(self, batch: Batch, version: int, proximal: bool = True) -> Pending:
        """Behaviour (the weights of ``version``) / old (unless ``proximal`` is False: ``Learner.make_experience``) /
        reference log-probs (+ values) of ``batch``; the result is ``batch`` with them (``Batch.put_rows``)."""
        refs, rows = self._on_shards("make_experience", batch, version, proximal)
        return Pending(refs, lambda parts: batch.put_rows(rows, parts))

    def train(self, batch: Batch, n_minibatches: int, seed: int, kl_coef: float) -> Pending:
        """The PPO update on ``batch`` (each rank its shard; ``kl_coef`` weighs a KL loss term); the result is the
        metrics averaged over ranks.

        The rows to learn are sharded anew, not kept from ``make_experience``: the experience shards are chosen
        before the rewards, and what ``rows_to_learn`` leaves of them (dropped rows, zero-spread groups) is in
        general neither the same count on every rank (DDP and DeepSpeed need the same micro-batches and optimizer
        steps on each) nor balanced in tokens. Keeping them would mean masked padding rows or moving rows between
        ranks, and other minibatches than one ``shard_rows`` over the rows left (each rank's minibatches are a
        permutation of its own shard, seeded by its rank). Shipping the rows again costs ~10 ms per step at
        ``configs/qwen3_1p7b_24gb.yaml``'s batch shape (``bench/ppo_sharding.py``)."""
        refs, _ = self._on_shards("train", batch, n_minibatches, seed, kl_coef)
        return Pending(refs, lambda per_rank: {k: float(np.mean([m[k] for m in per_rank])) for k in per_rank[0]})

    def adapter(self, version: int) -> ray.ObjectRef:
        """The LoRA tensors of ``version`` in the object store (every rank joins; rank 0's answer holds them)."""
        return self._on_every_rank("adapter_state", version)[0]

    def release_memory(self) -> None:
        """Every rank hands its allocator cache back to the GPU (a sleeping engine on the card wakes into it)."""
        ray.get(self._on_every_rank("release_memory"))

    def save(self, directory: str, with_optimizer: bool, behaviour_version: int | None = None) -> None:
        ray.get(self._on_every_rank("save", directory, with_optimizer, behaviour_version))

    def load(self, directory: str, behaviour_version: int) -> bool:
        """Restore every rank; whether the checkpoint held the behaviour weights (kept as ``behaviour_version``)."""
        return ray.get(self._on_every_rank("load", directory, behaviour_version))[0]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._placement)
            self._placement = None


def rollout_engine(cfg: Config, init_adapter: str | None) -> tuple[type, tuple]:
    """The engine class of ``ppo.rollout.engine`` and its constructor arguments."""
    ppo = cfg.ppo
    if ppo.rollout.engine == "vllm":
        from medrl.models.vllm_engine import check_engine

        check_engine("ppo.rollout", cfg.model, ppo.rollout.vllm)
        worker = VLLMConsultingWorker if cfg.consult.cases_per_step else VLLMRolloutWorker
        return worker, (cfg.model, init_adapter, ppo.generation, ppo.rollout.vllm)
    worker = ConsultingWorker if cfg.consult.cases_per_step else RolloutWorker  # dialogues: docs/consultation.md
    return worker, (cfg.model, init_adapter, ppo.generation)


class RolloutGroup:
    def __init__(self, engine_cls: type, engine_args: tuple, settings: RolloutSettings, num_gpus: float):
        actor_cls = ray.remote(engine_cls).options(num_cpus=settings.num_cpus, num_gpus=num_gpus,
                                                   max_restarts=settings.max_restarts,
                                                   max_task_retries=settings.max_restarts, scheduling_strategy="SPREAD")
        self.actors = [actor_cls.remote(*engine_args) for _ in range(settings.num_actors)]
        self.pids: list[int] = []

    def wait_ready(self) -> None:
        """Block until every engine is constructed; note their pids."""
        self.pids = ray.get([a.pid.remote() for a in self.actors])

    def generate(self, chunks: list[list[tuple[int, str]]], n: int, seeds: list[int], adapter_ref: ray.ObjectRef,
                 version: int) -> dict[ray.ObjectRef, int]:
        """Dispatch every micro-batch at once (chunk ``c`` to actor ``c % num_actors``); ``{ref: c}``."""
        return {self.actors[c % len(self.actors)].generate.remote(chunk, n, seeds[c], [adapter_ref], version): c
                for c, chunk in enumerate(chunks)}

    def consult(self, chunks: list[list[tuple[int, Any]]], n: int, seeds: list[int], adapter_ref: ray.ObjectRef,
                version: int, spec: Any, first_chunk: int) -> dict[ray.ObjectRef, int]:
        """Dispatch consultation micro-batches (``ConsultingWorker.consult``, ``VLLMConsultingWorker.consult``),
        numbered from ``first_chunk``."""
        return {self.actors[(first_chunk + c) % len(self.actors)].consult.remote(
            chunk, n, seeds[c], [adapter_ref], version, spec): first_chunk + c for c, chunk in enumerate(chunks)}

    def receive(self, ref: ray.ObjectRef, chunk: int) -> tuple[dict, bool]:
        """The answer of a finished ``generate`` call, and whether Ray restarted its actor since the last one."""
        out = ray.get(ref)
        k = chunk % len(self.actors)
        restarted = out["pid"] != self.pids[k]
        if restarted:  # Ray restarted this actor (and re-ran the lost calls)
            log.warning("rollout actor %d was restarted (pid %s -> %s)", k, self.pids[k], out["pid"])
            self.pids[k] = out["pid"]
        return out, restarted

    def sleep(self) -> float:
        """Every engine releases its GPU memory until its next ``generate``; the longest time it took."""
        return max(ray.get([a.sleep.remote() for a in self.actors]))

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class ActorGroups:
    """The learner group, the rollout group and the reward pool of one run; ``start`` them, ``close`` them."""

    def __init__(self, learner: LearnerGroup, rollout: RolloutGroup, reward_pool: RewardPool):
        self.learner, self.rollout, self.reward_pool = learner, rollout, reward_pool

    @classmethod
    def start(cls, cfg: Config, run: RunDir, init_adapter: str | None) -> "ActorGroups":
        """Check that every actor fits, then start them: the rollout engines' processes start while the learner
        ranks set up. The engine class (and its constructor arguments) is chosen here."""
        learner_gpus, rollout_gpus = check_actor_resources(cfg)
        ppo = cfg.ppo
        started: list = []
        try:
            rollout = RolloutGroup(*rollout_engine(cfg, init_adapter), ppo.rollout, rollout_gpus)
            started.append(rollout)
            started.append(RewardPool(cfg.reward, run))
            started.append(LearnerGroup(cfg, init_adapter, learner_gpus))
            rollout.wait_ready()
        except BaseException:
            for group in started:
                group.close()
            raise
        return cls(started[2], rollout, started[1])

    @staticmethod
    def wait_any(refs: list) -> Any:
        """The first of ``refs`` that is ready (or failed)."""
        return ray.wait(list(refs), num_returns=1)[0][0]

    @staticmethod
    def wait_all(refs: list) -> None:
        if refs:
            ray.wait(list(refs), num_returns=len(refs))

    def submit_rewards(self, items: list[RewardInput]) -> list:
        return self.reward_pool.submit(items)

    def reward_stats(self) -> dict:
        """The reward pool's cumulative totals (``RewardPool.stats``)."""
        return self.reward_pool.stats()

    def rewards(self, items: list[RewardInput], refs: list) -> tuple[list[RewardResult], int]:
        """The results of submitted reward tasks, in order, and how many were resubmitted (``RewardPool.collect``:
        a judge actor dead past its restarts is replaced first; the step's reward metrics and budget warning are
        logged as in ``medrl judge``)."""
        return self.reward_pool.collect(items, refs)

    def close(self) -> None:
        self.reward_pool.close()  # as before: the judges first, then the actors holding models
        self.rollout.close()
        self.learner.close()
