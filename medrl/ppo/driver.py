"""The PPO driver: the loop, one ``step()`` at a time, with checkpoint and restore. Its only door to Ray is
``medrl.ppo.groups.ActorGroups`` (the learner group, the rollout group, the reward pool).

    prompts (deterministic order) -> rollout engines generate, micro-batch by micro-batch
      -> each finished micro-batch goes to the reward pool at once (no waiting for the batch)
      -> learner ranks: old / behaviour / ref log-probs, values (while the judge works) -> rewards
      -> advantages (here) -> PPO update -> new LoRA tensors published; next step checks rollout vs learner log-probs.

With ``ppo.async_rollout`` the next step's rollout is dispatched as soon as this step's samples are out, with the
weights of before this step's update, so generation overlaps judging and learning (one-step off-policy); while the
driver waits on the judge or the learner, that rollout's finished micro-batches go on to the judge.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from medrl.config import Config
from medrl.models.card import finish_adapter
from medrl.models.chat import render_prompt
from medrl.models.loading import load_tokenizer, pick_device, pick_dtype
from medrl.ppo import checkpoint as ckpt
from medrl.ppo.algos import advantages_and_weights, num_minibatches, proximal_pass_needed, rows_to_learn
from medrl.ppo.batch import Batch, Rollout, load_prompts, micro_batches, prompt_turns, prompts_at, reward_input
from medrl.ppo.consult_plan import ConsultPlan
from medrl.ppo.groups import ActorGroups
from medrl.ppo.kl_controller import make_kl_controller
from medrl.ppo.preflight import absolute_paths, check_run_inputs, resolve_init_adapter
from medrl.ppo.step_log import SAMPLE_TABLE_COLUMNS, StepRecord, append_samples
from medrl.ppo.sync_check import abort_threshold, check_weight_sync, logprob_gaps
from medrl.reward.ledger import RateWaitMeter
from medrl.reward.types import RewardResult
from medrl.runs import MetricsLogger, RunDir, rewind_jsonl

log = logging.getLogger("medrl.ppo")


def run_ppo(cfg: Config, run: RunDir, *, resume: str | None = None) -> Path:
    """Train the RL adapter; returns ``run.ppo_adapter`` (LoRA + ``value_head.pt`` for gae). ``resume``: ``auto``
    (newest complete checkpoint, if any) or a checkpoint directory."""
    import ray

    from medrl.ray_utils import init_ray

    checkpoint = ckpt.find_resume(run.checkpoints("ppo"), resume)  # a bad --resume fails before anything starts
    check_run_inputs(cfg, run)
    run.record_stage(cfg, "ppo")
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


class PPOTrainer:
    """The loop, step by step (``step()``), with checkpoint/restore; ``run_ppo`` is the usual way in. ``groups``:
    actor groups already started (default: ``ActorGroups.start``, on the Ray cluster ``ray.init`` joined)."""

    def __init__(self, cfg: Config, run: RunDir, groups: ActorGroups | None = None):
        cfg = absolute_paths(cfg)
        self.cfg, self.ppo, self.run = cfg, cfg.ppo, run
        self.prompts = load_prompts(run.data / "rl_prompts.jsonl")
        self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.cache_dir)
        self.kl_ctl = make_kl_controller(self.ppo.kl)
        self.step_no = self.data_position = self.version = 0  # steps done, prompts used, adapter versions published
        self.adapter_ref = None
        self._ahead: Rollout | None = None  # async_rollout: the next step's rollout, already running
        self._resumed_behaviour: tuple | None = None  # (adapter ref, version) the first rollout after a resume uses
        self.metrics = MetricsLogger(run, "ppo")
        self.metrics.log_hparams(cfg.to_dict())
        self._rate_meter = RateWaitMeter(cfg.reward.judge)  # judge_rate_wait_s: what reward.judge.rpm/tpm cost
        self.gap_abort = abort_threshold(self.ppo, pick_dtype(cfg.model.dtype, pick_device(cfg.model.device)))
        rc = self.ppo.rollout  # vLLM on a GPU, synchronous: the engines sleep while the learner works
        self._engines_sleep = rc.engine == "vllm" and rc.vllm.sleep and not self.ppo.async_rollout
        self.groups = groups
        if groups is None:
            try:
                self.groups = ActorGroups.start(cfg, run, resolve_init_adapter(cfg, run))
            except BaseException:
                self.close()
                raise
        self.consult = None  # consultation cases (consult.cases_per_step): medrl.ppo.consult_plan
        if cfg.consult.cases_per_step:
            access = self.groups.reward_pool.patient_access() if cfg.consult.patient.provider == "openai" else None
            self.consult = ConsultPlan(cfg, access)
        self._publish_adapter()

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        """One PPO step, one line per phase (``rec`` collects each phase's time and figures for the metrics row); from
        the rewards on, the phases take and return the step's ``Batch`` (rewards with their rows). With ``async_rollout`` the samples of the step were drawn during the previous
        step (weights before its update). No rows to learn from (every group had zero reward spread with
        ``filter_zero_spread_groups``, or fewer samples were left than learner ranks): no update."""
        self.step_no += 1
        rec = StepRecord()
        rollout = rec.timed("generate", self._generate, rec)
        experience = rec.timed("experience", self._start_experience, rollout, rec)  # computed while the judge works
        results = rec.timed("reward_wait", self._rewards, rollout, rec)
        scored = rec.timed("experience", self._experience, experience, results, rollout.version, rec)
        learned = rec.timed("experience", self._rows_to_learn, scored, rec)
        if len(learned):
            learned, kl_coef = rec.timed("advantages", self._advantages, learned, rec)
            rec.timed("train", self._train, learned, kl_coef, rec)
            rec.timed("publish", self._publish_adapter)
        return self._log(rollout.records, scored, learned, rec)

    def _generate(self, rec: StepRecord) -> Rollout:
        """This step's samples (already running ahead, or dispatched now), each micro-batch to the judge as it comes
        in; then, with ``async_rollout``, the next step's rollout is dispatched with the weights of now."""
        rollout = self._ahead or self._launch_rollout(self.step_no, self.data_position)
        self._ahead = None
        while rollout.pending:
            self._take_micro_batch(rollout, self.groups.wait_any(list(rollout.pending)))
        if self.ppo.async_rollout and self.step_no < self.ppo.steps:
            self._ahead = self._launch_rollout(self.step_no + 1, rollout.end_position)
        rollout.pack(self.tokenizer.pad_token_id)
        rec.add(rollout_restarts=rollout.restarts, time_rollout_s=rollout.finished - rollout.started,
                time_actor_generate_s=rollout.actor_generate_s,
                rollout_staleness=self.version - rollout.version)  # updates between its weights and this update
        return rollout

    def _start_experience(self, rollout: Rollout, rec: StepRecord):
        """The learner's behaviour / old / ref log-probs and values of the rollout's batch, dispatched (they do not
        need the rewards; old ones only where the update needs a pass for them, ``proximal_pass_needed``). vLLM on a
        GPU, synchronous: the engines first free their memory for the learner (``generate`` wakes them)."""
        rec.add(time_engine_sleep_s=self.groups.rollout.sleep() if self._engines_sleep else 0.0)
        return self.groups.learner.make_experience(rollout.batch, rollout.version,
                                                   proximal_pass_needed(len(rollout.batch), self.ppo))

    def _rewards(self, rollout: Rollout, rec: StepRecord) -> list[RewardResult]:
        """The judge wait: every sample's reward, in row order (failed reward tasks resubmitted, counted)."""
        self._wait_feeding_ahead(rollout.reward_refs)
        results, retries = self.groups.rewards(rollout.reward_inputs, rollout.reward_refs)
        if self.consult is not None:
            results = self.consult.adjust(results, rollout.samples)
        rec.add(reward_retries=retries)
        self.data_position = rollout.end_position
        return results

    def _experience(self, experience, results: list[RewardResult], version: int, rec: StepRecord) -> Batch:
        """The batch with the learner's log-probs and values and the rewards (``Batch.with_rewards``), and the
        weight-sync proof: rollout vs learner log-probs of every sampled token under the ``version`` that drew it
        (``sync_check``)."""
        self._wait_feeding_ahead(experience.refs)
        batch = experience.result().with_rewards(results)
        gap, gap_mean = logprob_gaps(batch.rollout_logprobs, batch.behaviour_logprobs, batch.response_mask)
        check_weight_sync(self.step_no, version, gap, gap_mean, self.ppo.logprob_gap_tolerance, self.gap_abort)
        rec.add(logprob_gap=gap, logprob_gap_mean=gap_mean)
        return batch

    def _rows_to_learn(self, scored: Batch, rec: StepRecord) -> Batch:
        """The samples the reward plane dropped (and with ``filter_zero_spread_groups`` the groups of equal rewards)
        leave the batch, which is cut to a multiple of the learner ranks (equal shards on every rank)."""
        if bool(scored.dropped.all()):
            raise RuntimeError(f"step {self.step_no}: every sample's judgement failed (reward.judge.on_failure=drop "
                               f"leaves them unscored): is the judge reachable? (rules_only trains on the rules)")
        learned, stats = rows_to_learn(scored, self.ppo, self.ppo.learner.ranks)
        rec.add(**stats)
        return learned

    def _advantages(self, batch: Batch, rec: StepRecord) -> tuple[Batch, float]:
        """KL, advantages, returns and behaviour weights (``algos.advantages_and_weights``); the KL controller steps.
        Returns the batch with them and the KL coefficient used."""
        kl_coef = self.kl_ctl.value
        batch, stats = advantages_and_weights(self.ppo, batch, kl_coef)
        if "kl" in stats:  # no reference forward (nor KL) with a zero coefficient
            self.kl_ctl.update(stats["kl"], len(batch))
        rec.add(kl_coef=kl_coef, response_len=float(batch.response_mask.sum(1).mean()),
                finished_frac=float(batch.finished.double().mean()), **stats)
        return batch, kl_coef

    def _train(self, batch: Batch, kl_coef: float, rec: StepRecord) -> None:
        training = self.groups.learner.train(batch, num_minibatches(len(batch), self.ppo),
                                             self.cfg.run.seed * 100_003 + self.step_no, kl_coef)
        self._wait_feeding_ahead(training.refs)
        if self._engines_sleep:
            self.groups.learner.release_memory()
        metrics = training.result()
        if metrics.get("nonfinite_skipped"):
            log.warning("step %d: %d minibatch update(s) skipped on every rank: non-finite loss or gradient",
                        self.step_no, metrics["nonfinite_skipped"])
        rec.add(**metrics)

    def _publish_adapter(self) -> None:
        """The learner's live LoRA tensors, as a new version, go into the object store once; rollout engines fetch
        them from there when a ``generate`` call names a version they do not hold."""
        self.version += 1
        self.adapter_ref = self.groups.learner.adapter(self.version)

    def _log(self, records: list[dict], scored: Batch, learned: Batch, rec: StepRecord) -> dict[str, float]:
        """The step's metrics row (``metrics.jsonl``, TensorBoard) and its samples (``samples.jsonl``): every scored
        row, the reward figures of the rows learned from."""
        if not len(learned):
            why = ("every group had zero reward spread" if rec.row["zero_spread_frac"] == 1.0 and
                   self.ppo.filter_zero_spread_groups else f"fewer samples left than {self.ppo.learner.ranks} ranks")
            log.warning("step %d: %s: update skipped", self.step_no, why)
        wait = self._rate_meter.step(self.groups.reward_stats(), rec.row["time_reward_wait_s"])
        row = rec.finish(scored, learned, data_position=self.data_position, judge_rate_wait_s=wait)
        if row["judge_unscored_frac"] > self.ppo.unscored_warn_frac:
            log.warning("step %d: %.0f%% of the samples were left unscored (judgement failed): out of their groups' "
                        "baselines and the loss (ppo.unscored_warn_frac %.2f)", self.step_no,
                        100 * row["judge_unscored_frac"], self.ppo.unscored_warn_frac)
        self.metrics.log(self.step_no, row)
        if self.ppo.log_samples:
            rows = append_samples(self.run.ppo_samples, self.step_no, records, scored)
            self.metrics.log_table("samples", self.step_no, SAMPLE_TABLE_COLUMNS,
                                   [[r[c] for c in SAMPLE_TABLE_COLUMNS] for r in rows])
        return row

    # ------------------------------------------------------------------ rollout micro-batches
    def _launch_rollout(self, step_no: int, position: int) -> Rollout:
        """Dispatch the rollout micro-batches of step ``step_no`` (prompts from ``position``) to the engines, with the
        newest published adapter (after a resume of an async run: the restored behaviour weights)."""
        records = prompts_at(self.prompts, position, self.ppo.prompts_per_step, self.cfg.run.seed)
        adapter_ref, version = self._resumed_behaviour or (self.adapter_ref, self.version)
        self._resumed_behaviour = None
        texts = [render_prompt(self.tokenizer, self.cfg.model.system_prompt, prompt_turns(r)) for r in records]
        chunks, seeds = micro_batches(texts, self.ppo.rollout.batch_size, self.cfg.run.seed, step_no)
        pending = self.groups.rollout.generate(chunks, self.ppo.samples_per_prompt, seeds, adapter_ref, version)
        end = position + len(records)
        if self.consult is not None:  # the step's cases after its prompts (indices and chunks continue)
            cases = self.consult.records(step_no)
            c_chunks, c_seeds = self.consult.micro_batches(cases, len(records), len(chunks), step_no)
            pending.update(self.groups.rollout.consult(c_chunks, self.ppo.samples_per_prompt, c_seeds, adapter_ref,
                                                       version, self.consult.spec, len(chunks)))
            records = records + cases
        return Rollout(step_no, records, end, version, adapter_ref, pending, time.perf_counter())

    def _take_micro_batch(self, rollout: Rollout, ref) -> None:
        """A finished micro-batch: its samples go to the reward pool at once."""
        out, restarted = self.groups.rollout.receive(ref, rollout.pending.pop(ref))
        items = [self.consult.reward_input(rollout.records[s.prompt_index], rollout.step_no, s)
                 if s.dialogue is not None else
                 reward_input(rollout.records[s.prompt_index], rollout.step_no, s.sample_index, s.text)
                 for s in out["samples"]]
        rollout.add(out, restarted, items, self.groups.submit_rewards(items))

    def _wait_feeding_ahead(self, refs: list) -> None:
        """Wait until ``refs`` are ready (or failed); meanwhile the micro-batches of the rollout running ahead go to
        the reward pool as they finish, so their judging overlaps this step's wait."""
        waiting = set(refs)
        while waiting and self._ahead is not None and self._ahead.pending:
            ref = self.groups.wait_any([*waiting, *self._ahead.pending])
            if ref in self._ahead.pending:
                self._take_micro_batch(self._ahead, ref)
            else:
                waiting.discard(ref)
        self.groups.wait_all(list(waiting))

    # ------------------------------------------------------------------ loop, checkpoints, output
    def fit(self) -> None:
        every = self.ppo.checkpoint.every
        with tqdm(total=self.ppo.steps, initial=self.step_no, desc="ppo", unit="step") as bar:
            while self.step_no < self.ppo.steps:
                m = self.step()
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", kl=f"{m.get('kl', 0.0):.4f}",
                                gap=f"{m.get('logprob_gap', 0.0):.1e}")
                bar.update(1)
                if self.step_no % every == 0 or self.step_no == self.ppo.steps:
                    self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        tmp = ckpt.tmp_dir(self.run.checkpoints("ppo"), self.step_no)
        behaviour = self._ahead.version if self._ahead is not None else None  # what samples the next step
        self.groups.learner.save(str(tmp.resolve()), True, behaviour)
        state = {"step": self.step_no, "data_position": self.data_position,
                 "kl_controller": self.kl_ctl.state_dict(), "config_digest": self.cfg.digest(),
                 "learner_ranks": self.ppo.learner.ranks}
        path = ckpt.commit(tmp, state, self.ppo.checkpoint.keep_last)
        log.info("checkpoint: %s", path)
        return path

    def restore(self, path: Path) -> None:
        """Continue from a complete checkpoint directory (see ``checkpoint.find_resume``)."""
        state = ckpt.read_state(path, self.ppo.learner.ranks, self.cfg.digest())
        self._ahead = None  # drawn with weights the restored run no longer has
        behaviour = self.version + 1
        restored = self.groups.learner.load(str(path.resolve()), behaviour)
        self.step_no, self.data_position = state["step"], state["data_position"]
        self.metrics.rewind(self.step_no)  # steps past the checkpoint are done again: one history in the run dir
        rewind_jsonl(self.run.ppo_samples, self.step_no)
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self._resumed_behaviour = None
        if restored and self.ppo.async_rollout:  # the next step samples with the weights before the last update
            self.version = behaviour
            self._resumed_behaviour = (self.groups.learner.adapter(behaviour), behaviour)
        self._publish_adapter()
        log.info("resumed from %s at step %d", path, self.step_no)

    def save_final(self) -> Path:
        """The adapter (+ ``value_head.pt``) into ``run.ppo_adapter``, replacing an older one atomically."""
        tmp = self.run.ppo / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.groups.learner.save(str(tmp.resolve()), False)
        ckpt.install_final(tmp, self.run.ppo_adapter)
        finish_adapter(self.cfg, self.run, "ppo", self.tokenizer)
        log.info("PPO adapter written to %s", self.run.ppo_adapter)
        return self.run.ppo_adapter

    def close(self) -> None:
        if self.groups is not None:
            self.groups.close()
            self.groups = None
        self.metrics.close()

    def __enter__(self) -> "PPOTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
