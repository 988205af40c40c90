"""The PPO driver: owns the loop and the Ray actors.

    prompts (deterministic order) -> rollout actors generate, micro-batch by micro-batch
      -> each finished micro-batch goes to the reward pool at once (RewardPool.submit, no waiting for the batch)
      -> rewards + rule breakdown -> learner ranks: old/ref log-probs, values -> advantages (driver) -> PPO update
      -> new LoRA tensors -> rollout actors (object store); next step checks rollout vs learner log-probs.

With ``ppo.async_rollout`` the next step's rollout is dispatched as soon as this step's samples are out, with the
weights of before this step's update, so generation overlaps judging and learning (one-step off-policy).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from medrl.config import Config
from medrl.errors import UsageError
from medrl.models.chat import render_prompt
from medrl.models.loading import load_tokenizer
from medrl.ppo import checkpoint as ckpt
from medrl.ppo.experience import finalize_experience, pack_samples, shard_rows, take
from medrl.ppo.kl_controller import make_kl_controller
from medrl.ppo.learner import Learner, num_minibatches, read_deepspeed_config
from medrl.ppo.preflight import absolute_paths, check_actor_resources, resolve_init_adapter
from medrl.ppo.prompts import load_prompts, prompts_at
from medrl.ppo.rollout import RolloutWorker
from medrl.ray_utils import init_ray
from medrl.reward.pool import RewardPool
from medrl.reward.types import RewardInput, RewardResult
from medrl.runs import MetricsLogger, RunDir

log = logging.getLogger("medrl.ppo")

REWARD_RETRIES = 2
"""Resubmissions of a sample whose reward task failed (its judge actor died past its restarts)."""


def run_ppo(cfg: Config, run: RunDir, *, resume: str | None = None) -> Path:
    """Train the RL adapter; returns ``run.ppo_adapter`` (LoRA + ``value_head.pt`` for gae). ``resume``: ``auto``
    (newest complete checkpoint, if any) or a checkpoint directory."""
    checkpoint = ckpt.find_resume(run.checkpoints("ppo"), resume)  # a bad --resume fails before anything starts
    if resume is None and ckpt.complete_checkpoints(run.checkpoints("ppo")):
        raise UsageError(f"{run.checkpoints('ppo')} holds checkpoints of an earlier run: continue it with --resume "
                         f"auto, or remove them / choose another run.name")
    if resume == "auto" and checkpoint is None:
        log.info("no PPO checkpoint to resume from: starting at step 0")
    started = init_ray(cfg.ray)
    try:
        with PPOTrainer(cfg, run) as trainer:
            if checkpoint is not None:
                trainer.restore(checkpoint)
            trainer.fit()
            return trainer.save_final()
    finally:
        if started:
            ray.shutdown()


@dataclass
class Rollout:
    """The rollout micro-batches of one step, dispatched to the actors (``pending``: ObjectRef -> chunk index)."""

    step_no: int
    records: list[dict]
    end_position: int  # data position after this step's prompts
    version: int  # adapter version sampling it
    adapter_ref: ray.ObjectRef  # its tensors: kept alive while a restarted actor may need them
    pending: dict
    started: float
    # filled as micro-batches finish: samples, their reward inputs and reward ObjectRefs (already submitted)
    samples: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    reward_refs: list = field(default_factory=list)
    restarts: int = 0
    actor_generate_s: float = 0.0
    actor_logprob_s: float = 0.0
    finished: float = 0.0


class PPOTrainer:
    """The loop, step by step (``step()``), with checkpoint/restore; ``run_ppo`` is the usual way in."""

    def __init__(self, cfg: Config, run: RunDir):
        cfg = absolute_paths(cfg)
        self.cfg, self.ppo, self.run = cfg, cfg.ppo, run
        self.prompts = load_prompts(run.data / "rl_prompts.jsonl")
        self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.cache_dir)
        self.kl_ctl = make_kl_controller(self.ppo.kl)
        self.step_no = 0
        self.data_position = 0
        self.version = 0
        self.adapter_ref = None
        self._ahead: Rollout | None = None  # async_rollout: the next step's rollout, already running
        self._resumed_behaviour: tuple | None = None  # (adapter ref, version) the first rollout after a resume uses
        self._actors: list = []
        self._pg = None
        self.reward_pool = None
        self.metrics = MetricsLogger(run, "ppo")
        try:
            self.learner_gpus, self.rollout_gpus = check_actor_resources(cfg)
            init_adapter = resolve_init_adapter(cfg, run)
            self._start_rollouts(init_adapter)  # their processes start while the learners set up
            self.reward_pool = RewardPool(cfg.reward, run)
            self._start_learners(init_adapter)
            self._rollout_pids = ray.get([r.pid.remote() for r in self.rollouts])
        except BaseException:
            self.close()
            raise
        self._publish_adapter()

    # ------------------------------------------------------------------ actors
    def _start_learners(self, init_adapter: str | None) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lc = self.ppo.learner
        ds_config = read_deepspeed_config(lc.deepspeed)
        bundle = {"CPU": lc.num_cpus, **({"GPU": self.learner_gpus} if self.learner_gpus else {})}
        self._pg = placement_group([bundle] * lc.ranks, strategy="STRICT_PACK")  # one node: 127.0.0.1 rendezvous
        ray.get(self._pg.ready(), timeout=300)
        actor_cls = ray.remote(Learner)
        self.learners = [
            actor_cls.options(num_cpus=lc.num_cpus, num_gpus=self.learner_gpus,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, rank))
            .remote(self.cfg, rank, lc.ranks, init_adapter, ds_config) for rank in range(lc.ranks)]
        self._actors += self.learners
        port = ray.get(self.learners[0].free_port.remote())
        self.learner_info = ray.get([a.setup.remote(port) for a in self.learners])
        log.info("learner: %d rank(s), %s, %d trainable parameters", lc.ranks,
                 self.learner_info[0]["distributed_type"], self.learner_info[0]["trainable_params"])

    def _start_rollouts(self, init_adapter: str | None) -> None:
        rc = self.ppo.rollout
        actor_cls = ray.remote(RolloutWorker).options(num_cpus=rc.num_cpus, num_gpus=self.rollout_gpus,
                                                      max_restarts=rc.max_restarts, max_task_retries=rc.max_restarts)
        self.rollouts = [actor_cls.remote(self.cfg.model, init_adapter, self.ppo.generation,
                                          self.ppo.micro_batch_size) for _ in range(rc.num_actors)]
        self._actors += self.rollouts

    def _publish_adapter(self) -> None:
        """The learner's live LoRA tensors, as a new version, go into the object store once; rollout actors fetch
        them from there when a ``generate`` call names a version they do not hold."""
        self.version += 1
        self.adapter_ref = self._adapter_of(self.version)

    def _adapter_of(self, version: int) -> ray.ObjectRef:
        return [a.adapter_state.remote(version) for a in self.learners][0]  # all ranks join; rank 0 returns

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        """One PPO step. With ``async_rollout`` the samples of the step were started during the previous step (with
        the weights before its update), and this step starts the next step's rollouts as soon as its own are out."""
        self.step_no += 1
        t_start = time.perf_counter()
        rollout = self._ahead or self._launch_rollout(self.step_no, self.data_position)
        self._ahead = None
        while rollout.pending:
            self._take_micro_batch(rollout, ray.wait(list(rollout.pending), num_returns=1)[0][0])
        t_generated = time.perf_counter()
        if self.ppo.async_rollout and self.step_no < self.ppo.steps:
            self._ahead = self._launch_rollout(self.step_no + 1, rollout.end_position)
        # old/ref log-probs (+ values) do not depend on the rewards: the learner computes them while the judge works
        samples = rollout.samples
        order = sorted(range(len(samples)), key=lambda i: (samples[i].prompt_index, samples[i].sample_index))
        samples = [samples[i] for i in order]
        batch = pack_samples(samples, self.tokenizer.pad_token_id)
        experience = [a.make_experience.remote(s, rollout.version) for a, s in zip(self.learners, self._shards(batch))]
        self._wait(rollout.reward_refs)
        results, reward_retries = self._collect_rewards(rollout.inputs, rollout.reward_refs)
        results = [results[i] for i in order]
        self.data_position = rollout.end_position
        t_scored = time.perf_counter()
        parts = ray.get(self._wait(experience))
        batch.update({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
        keep = [i for i, r in enumerate(results) if not r.dropped]
        keep = keep[:len(keep) - len(keep) % self.ppo.learner.ranks]  # equal shards on every rank
        if not keep:
            raise RuntimeError(f"step {self.step_no}: every sample was dropped by the reward plane")
        if len(keep) < len(results):
            batch = take(batch, torch.tensor(keep))
        t_experience = time.perf_counter()
        mask = batch["response_mask"]
        gap = float(((batch["rollout_logprobs"] - batch["behaviour_logprobs"]).abs() * mask).max())
        if gap > self.ppo.logprob_gap_tolerance:
            log.warning("step %d: rollout vs learner log-prob gap %.2e > tolerance %.0e (weight sync or numerics)",
                        self.step_no, gap, self.ppo.logprob_gap_tolerance)
        scores = torch.tensor([results[i].reward for i in keep])
        group = torch.tensor([samples[i].prompt_index for i in keep])
        kl_coef = self.kl_ctl.value
        exp_stats = finalize_experience(batch, scores, group, kl_coef, self.ppo)
        n_mb = num_minibatches(len(keep), self.ppo)
        seed = self.cfg.run.seed * 100_003 + self.step_no
        train = ray.get(self._wait([a.train.remote(s, n_mb, seed)
                                    for a, s in zip(self.learners, self._shards(batch))]))
        self.kl_ctl.update(exp_stats["kl"], len(keep))
        staleness = self.version - rollout.version  # updates between the sampling weights and this update's start
        self._publish_adapter()
        t_end = time.perf_counter()
        kept = [results[i] for i in keep]
        metrics = {
            **self._reward_metrics(kept, results),
            **{k: float(np.mean([m[k] for m in train])) for k in train[0]},
            **exp_stats,
            "kl_coef": kl_coef,
            "logprob_gap": gap,
            "response_len": float(mask.sum(1).mean()),
            "finished_frac": float(np.mean([samples[i].finished for i in keep])),
            "samples": len(keep),
            "rollout_restarts": rollout.restarts,
            "reward_retries": reward_retries,
            "rollout_staleness": staleness,
            "time_generate_s": t_generated - t_start,
            "time_rollout_s": rollout.finished - rollout.started,
            "time_actor_generate_s": rollout.actor_generate_s,
            "time_actor_logprob_s": rollout.actor_logprob_s,
            "time_score_s": t_scored - t_generated,
            "time_experience_s": t_experience - t_scored,
            "time_train_s": t_end - t_experience,
            "time_learn_s": t_end - t_scored,
            "time_step_s": t_end - t_start,
            "data_position": self.data_position,
        }
        self.metrics.log(self.step_no, metrics)
        if self.ppo.log_samples:
            self._log_samples(rollout.records, samples, results)
        return metrics

    def _shards(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        n = batch["response_ids"].shape[0]
        return [{k: v[rows] for k, v in batch.items()} for rows in shard_rows(n, len(self.learners))]

    def _launch_rollout(self, step_no: int, position: int) -> "Rollout":
        """Dispatch the rollout micro-batches of step ``step_no`` (prompts from ``position``) to the actors, with the
        newest published adapter (after a resume of an async run: the restored behaviour weights)."""
        records = prompts_at(self.prompts, position, self.ppo.prompts_per_step, self.cfg.run.seed)
        adapter_ref, version = self._resumed_behaviour or (self.adapter_ref, self.version)
        self._resumed_behaviour = None
        n, bs = self.ppo.samples_per_prompt, self.ppo.rollout.batch_size
        texts = [render_prompt(self.tokenizer, self.cfg.model.system_prompt, r["prompt"]) for r in records]
        pending = {}
        for c, start in enumerate(range(0, len(records), bs)):
            chunk = [(i, texts[i]) for i in range(start, min(start + bs, len(records)))]
            actor = self.rollouts[c % len(self.rollouts)]
            seed = (self.cfg.run.seed * 1_000_003 + step_no * 1_009 + c) % 2**31
            pending[actor.generate.remote(chunk, n, seed, [adapter_ref], version)] = c
        return Rollout(step_no, records, position + len(records), version, adapter_ref, pending, time.perf_counter())

    def _take_micro_batch(self, rollout: Rollout, ref: ray.ObjectRef) -> None:
        """A finished micro-batch: its samples go to the reward pool at once."""
        c = rollout.pending.pop(ref)
        out = ray.get(ref)
        k = c % len(self.rollouts)
        if out["pid"] != self._rollout_pids[k]:  # Ray restarted this actor (and re-ran the lost calls)
            log.warning("rollout actor %d was restarted (pid %s -> %s)", k, self._rollout_pids[k], out["pid"])
            self._rollout_pids[k] = out["pid"]
            rollout.restarts += 1
        rollout.actor_generate_s += out["generate_s"]
        rollout.actor_logprob_s += out["score_s"]
        items = []
        for s in out["samples"]:
            rec = rollout.records[s.prompt_index]
            items.append(RewardInput(
                id=f"{rec['id']}:{rollout.step_no}:{s.sample_index}", prompt=rec["prompt"], response=s.text,
                reference=rec.get("reference"), risk=rec.get("risk") or "low",
                expected_behavior=rec.get("expected_behavior"), language=rec.get("language")))
        rollout.samples += out["samples"]
        rollout.inputs += items
        rollout.reward_refs += self.reward_pool.submit(items)
        rollout.finished = time.perf_counter()

    def _wait(self, refs: list) -> list:
        """Wait until ``refs`` are ready (or failed) and return them; meanwhile the micro-batches of the rollout
        running ahead go to the reward pool as they finish, so their judging overlaps this step's update."""
        waiting = set(refs)
        while waiting and self._ahead is not None and self._ahead.pending:
            ref = ray.wait([*waiting, *self._ahead.pending], num_returns=1)[0][0]
            if ref in self._ahead.pending:
                self._take_micro_batch(self._ahead, ref)
            else:
                waiting.discard(ref)
        if waiting:
            ray.wait(list(waiting), num_returns=len(waiting))
        return refs

    def _collect_rewards(self, inputs: list[RewardInput], refs: list) -> tuple[list[RewardResult], int]:
        results, retries = [], 0
        for item, ref in zip(inputs, refs):
            for attempt in range(REWARD_RETRIES + 1):
                try:
                    results.append(ray.get(ref))
                    break
                except ray.exceptions.RayError as exc:
                    if attempt == REWARD_RETRIES:
                        raise
                    log.warning("reward of %s failed (%s); resubmitting", item.id, type(exc).__name__)
                    retries += 1
                    ref = self.reward_pool.submit([item])[0]
        return results, retries

    @staticmethod
    def _reward_metrics(kept: list[RewardResult], results: list[RewardResult]) -> dict[str, float]:
        rewards = np.array([r.reward for r in kept])
        out = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
        for name in sorted({k for r in kept for k in r.components}):
            values = [r.components[name] for r in kept if name in r.components]
            out[f"reward/{name}"] = float(np.mean(values))
        status = [r.judge_status for r in results]
        judged = status.count("ok") + status.count("cached")
        out.update(judge_failed=status.count("failed"), dropped=sum(r.dropped for r in results),
                   judge_tokens_in=sum(r.tokens_in for r in results),
                   judge_tokens_out=sum(r.tokens_out for r in results),
                   judge_cost_usd=sum(r.cost_usd for r in results),
                   cache_hit_rate=status.count("cached") / judged if judged else 0.0)
        return out

    def _log_samples(self, records, samples, results) -> None:
        self.run.ppo.mkdir(parents=True, exist_ok=True)
        with open(self.run.ppo_samples, "a", encoding="utf-8") as f:
            for s, r in zip(samples, results):
                f.write(json.dumps({"step": self.step_no, "id": records[s.prompt_index]["id"],
                                    "sample": s.sample_index, "response": s.text, "reward": r.reward,
                                    "components": r.components, "judge_status": r.judge_status,
                                    "dropped": r.dropped}, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------ loop, checkpoints, output
    def fit(self) -> None:
        every = self.ppo.checkpoint.every
        with tqdm(total=self.ppo.steps, initial=self.step_no, desc="ppo", unit="step") as bar:
            while self.step_no < self.ppo.steps:
                m = self.step()
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", kl=f"{m['kl']:.4f}", gap=f"{m['logprob_gap']:.1e}")
                bar.update(1)
                if self.step_no % every == 0 or self.step_no == self.ppo.steps:
                    self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        tmp = ckpt.tmp_dir(self.run.checkpoints("ppo"), self.step_no)
        behaviour = self._ahead.version if self._ahead is not None else None  # what samples the next step
        ray.get([a.save.remote(str(tmp.resolve()), True, behaviour) for a in self.learners])
        state = {"step": self.step_no, "data_position": self.data_position,
                 "kl_controller": self.kl_ctl.state_dict(), "config_digest": self.cfg.digest(),
                 "learner_ranks": len(self.learners)}
        path = ckpt.commit(tmp, state, self.ppo.checkpoint.keep_last)
        log.info("checkpoint: %s", path)
        return path

    def restore(self, path: Path) -> None:
        """Continue from a complete checkpoint directory (see ``checkpoint.find_resume``)."""
        state = ckpt.read_state(path)
        if state["learner_ranks"] != len(self.learners):
            raise UsageError(f"{path}: saved with {state['learner_ranks']} learner rank(s), config has "
                             f"{len(self.learners)} (ppo.learner.ranks)")
        if state["config_digest"] != self.cfg.digest():
            log.warning("resuming %s written under a different config (digest %s, now %s)", path,
                        state["config_digest"], self.cfg.digest())
        self._ahead = None  # drawn with weights the restored run no longer has
        behaviour = self.version + 1
        restored = ray.get([a.load.remote(str(path.resolve()), behaviour) for a in self.learners])[0]
        self.step_no, self.data_position = state["step"], state["data_position"]
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self._resumed_behaviour = None
        if restored and self.ppo.async_rollout:  # the next step samples with the weights before the last update
            self.version = behaviour
            self._resumed_behaviour = (self._adapter_of(behaviour), behaviour)
        self._publish_adapter()
        log.info("resumed from %s at step %d", path, self.step_no)

    def save_final(self) -> Path:
        """The adapter (+ ``value_head.pt``) into ``run.ppo_adapter``, replacing an older one atomically."""
        tmp = self.run.ppo / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ray.get([a.save.remote(str(tmp.resolve()), False) for a in self.learners])
        if (tmp / "value_head.pt").is_file():
            (tmp / "value_head.pt").rename(tmp / "adapter" / "value_head.pt")
        if self.run.ppo_adapter.exists():
            shutil.rmtree(self.run.ppo_adapter)
        (tmp / "adapter").rename(self.run.ppo_adapter)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("PPO adapter written to %s", self.run.ppo_adapter)
        return self.run.ppo_adapter

    def close(self) -> None:
        if self.reward_pool is not None:
            self.reward_pool.close()
            self.reward_pool = None
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
        self.metrics.close()

    def __enter__(self) -> "PPOTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
