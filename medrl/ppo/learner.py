"""One learner rank: policy (base + LoRA) with a value head, trained with Accelerate (optionally its DeepSpeed
plugin). The driver runs 1..N of these as Ray actors that form one torch process group (gloo on CPU, NCCL on GPU);
they receive equal shards of every batch and all-reduce gradients, so their weights stay identical.

No Ray in here: ``medrl.ppo.groups.LearnerActor`` (a ``Learner`` that can tell its Ray node) is the actor class.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from medrl.errors import UsageError
from medrl.models.loading import load_policy, pick_device
from medrl.ppo.algos import num_minibatches
from medrl.ppo.batch import Batch
from medrl.ppo.modeling import PolicyWithValue, logprobs_and_values, make_value_head, old_and_ref_logprobs
from medrl.ppo.objective import finite_on_all_ranks, loss_denominators, micro_batch_loss, stand_in_loss

log = logging.getLogger("medrl.ppo.learner")

BEHAVIOUR_FILE = "behaviour_weights.pt"
"""In a checkpoint of an ``async_rollout`` run: the LoRA weights that sample the step after it."""


def read_deepspeed_config(path: str | None) -> dict | None:
    """The DeepSpeed JSON named by ``ppo.learner.deepspeed`` (read by the driver: actors on other nodes may not
    have the file at the same path)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"ppo.learner.deepspeed: file not found: {path}")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


class TrainTally:
    """The statistics of one ``Learner.train`` call: token-weighted sums of the micro-batches' figures, the losses
    of the minibatches that updated, their gradient norms, and the minibatches skipped."""

    def __init__(self) -> None:
        self.token_sums: dict[str, float] = {}
        self.tokens = 0.0
        self.loss_sums: dict[str, float] = {}
        self.updates = self.skipped = 0
        self.grad_norms: list[float] = []

    def add_tokens(self, info: dict[str, torch.Tensor], tokens: float) -> None:
        self.tokens += tokens
        for key, value in info.items():
            self.token_sums[key] = self.token_sums.get(key, 0.0) + float(value) * tokens

    def add_update(self, losses: dict[str, float], grad_norm) -> None:
        self.updates += 1
        for key, value in losses.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
        if grad_norm is not None:
            self.grad_norms.append(float(grad_norm))

    def metrics(self, lr: float) -> dict[str, float]:
        metrics = {k: v / max(self.tokens, 1.0) for k, v in self.token_sums.items()}
        metrics.update({k: v / max(self.updates, 1) for k, v in self.loss_sums.items()})
        metrics["grad_norm"] = float(np.mean(self.grad_norms)) if self.grad_norms else 0.0
        metrics["lr"] = lr
        metrics["nonfinite_skipped"] = self.skipped
        return metrics


class Learner:
    def __init__(self, cfg, rank: int = 0, world_size: int = 1, init_adapter: str | None = None,
                 deepspeed_config: dict | None = None):
        self.cfg, self.ppo = cfg, cfg.ppo
        self.rank, self.world_size = rank, world_size
        self.init_adapter = init_adapter
        self.deepspeed_config = deepspeed_config
        self.accelerator = None
        # async_rollout: LoRA weights of the published versions that rollouts may still be sampling with
        self._snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self._live_version: int | None = None  # the published version the live weights are (None after an update)

    # ------------------------------------------------------------------ setup
    def setup(self, master_addr: str, master_port: int, local_rank: int) -> dict:
        """Join the process group at rank 0's ``master_addr:master_port`` (``local_rank``: this rank's index among
        the ranks on its node), load the policy, build the value head, optimizer and scheduler, and wrap them with
        Accelerate. Returns facts the driver checks."""
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs
        from transformers import get_scheduler

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0" if torch.cuda.is_available() else
                          str(local_rank))
        on_cpu = pick_device(self.cfg.model.device) == "cpu"
        pg = [InitProcessGroupKwargs(backend="gloo" if on_cpu else "nccl")]
        ds_config = self._deepspeed_config() if self.deepspeed_config is not None else None
        if ds_config is not None:
            # accelerate's recipe for DeepSpeed on CPU and GPU alike (see ../shared/STACK.md): env + plugin, no cpu=
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
            self.accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=pg)
        else:
            self.accelerator = Accelerator(cpu=on_cpu, kwargs_handlers=pg if self.world_size > 1 else [])
        torch.manual_seed(self.cfg.run.seed)
        policy = load_policy(self.cfg.model, self.init_adapter, trainable=True, device=str(self.accelerator.device))
        for module in policy.modules():  # as trl's disable_dropout_in_model (importing trl costs seconds)
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # PPO ratios must be exactly 1 before the first update
        if self.cfg.model.gradient_checkpointing:
            policy.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
        self.use_values = self.ppo.uses_critic
        value_head = make_value_head(policy) if self.use_values else None
        model = PolicyWithValue(policy, value_head, detach_value=self.ppo.value_head == "detached")
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": self.ppo.lr}]
        if value_head is not None:
            groups.append({"params": list(value_head.parameters()), "lr": self.ppo.value_lr})
        trainable = sum(p.numel() for g in groups for p in g["params"])
        if ds_config is not None and "optimizer" in ds_config:  # DeepSpeed builds it (e.g. CPU Adam for offload)
            optimizer = DummyOptim(groups, lr=self.ppo.lr, weight_decay=self.ppo.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=self.ppo.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        per_step = num_minibatches(self.ppo.prompts_per_step * self.ppo.samples_per_prompt, self.ppo)
        # stepped by hand after each optimizer step (accelerate would step it once per process)
        self.scheduler = get_scheduler(self.ppo.lr_scheduler, self.optimizer, num_warmup_steps=self.ppo.warmup_steps,
                                       num_training_steps=self.ppo.steps * self.ppo.ppo_epochs * per_step)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ppo.async_rollout and self.zero_stage == 3:
            raise UsageError("ppo.async_rollout needs whole weights on every learner rank: use ZeRO stage 0-2, not "
                             "3, or set ppo.async_rollout=false")
        dist = torch.distributed.is_initialized()
        return {"rank": self.rank, "num_processes": self.accelerator.num_processes,
                "world_size": torch.distributed.get_world_size() if dist else 1,
                "distributed_type": str(self.accelerator.distributed_type), "device": str(self.accelerator.device),
                "trainable_params": trainable}

    def _deepspeed_config(self) -> dict:
        """The DeepSpeed JSON with its ``auto`` values filled from the ``ppo`` section and the model's shape."""
        from transformers import AutoConfig

        from medrl.models.loading import resolve_model_path

        ds = copy.deepcopy(self.deepspeed_config)
        # micro-batches and accumulation are driven by the PPO loop: one DeepSpeed micro step per backward, the
        # boundary set by hand (accelerate's sync_gradients), the loss already normalised over the minibatch.
        ds.update(train_micro_batch_size_per_gpu=self.ppo.micro_batch_size, gradient_accumulation_steps=1,
                  train_batch_size=self.ppo.micro_batch_size * self.world_size,
                  gradient_clipping=self.ppo.max_grad_norm)
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # a torch AdamW is fine (DeepSpeed's CPU Adam: ~50 s build)
        params = ds.get("optimizer", {}).get("params", {})
        for key, value in (("lr", self.ppo.lr), ("weight_decay", self.ppo.weight_decay), ("betas", [0.9, 0.999]),
                           ("eps", 1e-8)):
            if params.get(key) == "auto":
                params[key] = value
        dtype = self.cfg.model.dtype if self.cfg.model.dtype != "auto" else (
            "float32" if pick_device(self.cfg.model.device) == "cpu" else "bfloat16")
        for key, name in (("bf16", "bfloat16"), ("fp16", "float16")):
            if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
                ds[key]["enabled"] = dtype == name
        if isinstance(ds.get("bf16"), dict):  # bf16 ZeRO skips a step with non-finite gradients only when asked
            ds["bf16"].setdefault("check_grad_overflow", True)
        zero = ds.get("zero_optimization", {})
        hidden = AutoConfig.from_pretrained(resolve_model_path(self.cfg.model.path, self.cfg.model.cache_dir)
                                            ).hidden_size
        for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size",
                           int(0.9 * hidden * hidden)), ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key) == "auto":
                zero[key] = value
        return ds

    @property
    def zero_stage(self) -> int:
        plugin = self.accelerator.state.deepspeed_plugin
        return plugin.zero_stage if plugin is not None else 0

    def _gathered(self, params):
        """ZeRO-3 partitions parameters; gather them (collectively) to read or write whole tensors."""
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params))
        return nullcontext()

    # ------------------------------------------------------------------ experience and training
    def make_experience(self, shard: Batch, version: int | None = None, proximal: bool = True
                        ) -> dict[str, torch.Tensor]:
        """This rank's shard's log-probs, on CPU: ``behaviour_logprobs`` from the weights of the published ``version``
        that sampled it (None: the live weights), for the rollout/learner check and the behaviour weights;
        ``old_logprobs`` (+ values) from the live weights, the proximal policy, unless ``proximal`` is False and the
        samples are stale (``proximal_pass_needed``: the training forward supplies them); reference log-probs with a
        non-zero KL coefficient. Only these fields go back (``Batch`` field names, as wide as the shard's
        ``response_ids``)."""
        with_reference = self.ppo.kl.init_coef > 0
        if not proximal and not self._is_live(version):
            with self._weights_of(version):  # the reference disables the adapter: any weights will do
                out = old_and_ref_logprobs(self.model, self.unwrapped.policy, shard, self.ppo.micro_batch_size,
                                           self.ppo.generation.temperature, False, device=self.accelerator.device,
                                           with_reference=with_reference)
            out["behaviour_logprobs"] = out.pop("old_logprobs")
            return out
        out = old_and_ref_logprobs(self.model, self.unwrapped.policy, shard, self.ppo.micro_batch_size,
                                   self.ppo.generation.temperature, self.use_values, device=self.accelerator.device,
                                   with_reference=with_reference)
        if self._is_live(version):
            out["behaviour_logprobs"] = out["old_logprobs"]
        else:
            with self._weights_of(version):
                out["behaviour_logprobs"] = logprobs_and_values(
                    self.model, shard, self.ppo.micro_batch_size, self.ppo.generation.temperature,
                    with_values=False, device=self.accelerator.device)["logprobs"]
        return out

    def _is_live(self, version: int | None) -> bool:
        return version is None or version == self._live_version

    def _adapter_params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unwrapped.policy.named_parameters() if p.requires_grad}

    @contextmanager
    def _weights_of(self, version: int | None):
        """The live LoRA weights replaced by those of ``version`` for the block, then put back bit for bit. With
        ``async_rollout`` a step's samples come from the version before the live one."""
        if self._is_live(version):
            yield
            return
        if version not in self._snapshots:
            raise RuntimeError(f"no snapshot of adapter version {version} (kept: {sorted(self._snapshots)})")
        params = self._adapter_params()
        live = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self._snapshots[version][n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(live[n])

    def train(self, shard: Batch, n_minibatches: int, seed: int, kl_coef: float = 0.0) -> dict[str, float]:
        """``ppo_epochs`` passes over the shard in ``n_minibatches`` optimizer steps each (the same count on every
        rank). Losses follow ``ppo.loss_agg_mode`` over each minibatch, all ranks' rows together (``kl_coef`` weighs
        the KL loss term of ``kl.placement=loss``); metrics are token-weighted means, losses means over minibatches.
        A minibatch with a non-finite loss (or gradient) on any rank is skipped by all ranks: its gradients never
        reach the optimizer, and it is counted in ``nonfinite_skipped``."""
        self.model.train()
        gen = torch.Generator().manual_seed(seed * 1009 + self.rank)
        tally = TrainTally()
        for _ in range(self.ppo.ppo_epochs):
            for rows in torch.randperm(len(shard), generator=gen).tensor_split(n_minibatches):
                self._minibatch_update(shard, rows, kl_coef, tally)
        self._live_version = None
        return tally.metrics(self.scheduler.get_last_lr()[0])

    def _minibatch_update(self, shard: Batch, rows: torch.Tensor, kl_coef: float, tally: "TrainTally") -> None:
        """One optimizer step over the minibatch ``rows`` of the shard (the gradients of its micro-batches), or none
        when its loss or gradient is not finite on some rank."""
        acc = self.accelerator
        bad, losses = self._backward(shard, rows, kl_coef, tally)
        norm = acc.clip_grad_norm_(self.model.parameters(), self.ppo.max_grad_norm)
        bad = bad or (norm is not None and not math.isfinite(float(norm)))  # the same on every rank
        if bad:  # DeepSpeed discarded them in its step (see stand_in_loss); plain torch: dropped here
            tally.skipped += 1
            log.warning("rank %d: minibatch update skipped: non-finite loss or gradient", self.rank)
        else:
            self.optimizer.step()
            self.scheduler.step()
            tally.add_update(losses, norm)
        self.optimizer.zero_grad()

    def _backward(self, shard: Batch, rows: torch.Tensor, kl_coef: float, tally: "TrainTally"
                  ) -> tuple[bool, dict[str, float]]:
        """Forward and backward of the minibatch ``rows``, micro-batch by micro-batch, each micro-batch's statistics
        into ``tally``. Returns whether a loss was not finite on some rank (every later micro-batch then backs a
        stand-in loss, so that all ranks run the same backwards) and the minibatch's losses."""
        ppo, acc = self.ppo, self.accelerator
        deepspeed = acc.state.deepspeed_plugin is not None
        micro = rows.split(ppo.micro_batch_size)
        n_tokens, n_seqs = loss_denominators(shard.loss_mask[rows], acc.device)  # all ranks' counts
        bad = False
        losses: dict[str, float] = {}
        for i, micro_rows in enumerate(micro):
            last = i == len(micro) - 1
            acc.sync_gradients = last  # DeepSpeed: accumulation boundary; DDP: all-reduce on the last
            mb = shard.take(micro_rows).to(acc.device)
            with nullcontext() if last else acc.no_sync(self.model):
                out = self.model(mb.input_ids, mb.attention_mask, mb.prompt_lens, mb.response_ids,
                                 temperature=ppo.generation.temperature, with_values=self.use_values,
                                 with_entropy=ppo.log_entropy)
                entropy = out.pop("entropy", None)
                loss, info = micro_batch_loss(out, mb, ppo, kl_coef, n_tokens, n_seqs)
                bad = bad or not finite_on_all_ranks(loss)
                acc.backward(stand_in_loss(out, poison=deepspeed and last) if bad else loss)
            if bad:
                continue
            if entropy is not None:
                info["entropy"] = (entropy * mb.loss_mask).sum() / mb.loss_mask.sum().clamp(min=1)
            for key in ("policy_loss", "kl_loss"):
                if key in info:
                    losses[key] = losses.get(key, 0.0) + float(info.pop(key))
            tally.add_tokens(info, float(mb.loss_mask.sum()))
        return bad, losses

    def release_memory(self) -> None:
        """Hand the allocator's cached blocks back to the device, so a sleeping vLLM engine on the same GPU wakes
        into them (called between the update and the next rollout when the engines sleep)."""
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ weights out
    def adapter_state(self, version: int) -> dict[str, torch.Tensor] | None:
        """Only the LoRA tensors (CPU copies) of the published ``version``, for the rollout actors: rank 0 returns
        them, the other ranks None. A new version is the live weights (with ``async_rollout`` a snapshot of them is
        kept, with the one before, to score the samples drawn with them); a kept one is read from its snapshot.
        Every rank must call it (ZeRO-3 gathers the partitioned tensors collectively)."""
        from peft import get_peft_model_state_dict

        if version != self._live_version and version not in self._snapshots:  # a new version: the live weights
            self._live_version = version
            if self.ppo.async_rollout:
                self._snapshots[version] = {n: p.detach().clone() for n, p in self._adapter_params().items()}
                for old in sorted(self._snapshots)[:-2]:
                    del self._snapshots[old]
        with self._weights_of(version), \
                self._gathered(p for n, p in self.unwrapped.named_parameters() if "lora_" in n):
            if self.rank != 0:
                return None
            state = get_peft_model_state_dict(self.unwrapped.policy)
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def save(self, directory: str, with_optimizer: bool = True, behaviour_version: int | None = None) -> None:
        """Adapter (peft format) and value head; with ``with_optimizer`` also optimizer, scheduler and this rank's
        RNG states, and the kept snapshot of ``behaviour_version`` (the weights the next step's samples are being
        drawn with, under ``async_rollout``). Every rank must call it (DeepSpeed saves its partitioned optimizer
        state collectively)."""
        out = Path(directory)
        main = self.accelerator.is_main_process
        if main:
            out.mkdir(parents=True, exist_ok=True)
            if with_optimizer and behaviour_version is not None and behaviour_version != self._live_version:
                snapshot = {n: t.cpu() for n, t in self._snapshots[behaviour_version].items()}
                torch.save(snapshot, out / BEHAVIOUR_FILE)
        self.accelerator.wait_for_everyone()
        with self._gathered(p for p in self.unwrapped.parameters() if p.requires_grad):
            if main:
                self.unwrapped.policy.save_pretrained(out / "adapter")
                if self.unwrapped.value_head is not None:
                    head = {k: v.detach().float().cpu() for k, v in self.unwrapped.value_head.state_dict().items()}
                    torch.save(head, out / "value_head.pt")
        if with_optimizer:
            if self.accelerator.state.deepspeed_plugin is not None:
                self.model.save_checkpoint(str(out / "deepspeed"), tag="state", exclude_frozen_parameters=True)
            elif main:
                torch.save(self.optimizer.state_dict(), out / "optimizer.pt")
            if main:
                torch.save(self.scheduler.state_dict(), out / "scheduler.pt")
            torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                       out / f"rng_rank{self.rank}.pt")
        self.accelerator.wait_for_everyone()

    def load(self, directory: str, behaviour_version: int | None = None) -> bool:
        """Restore what ``save`` wrote (weights, optimizer, scheduler, RNG). A saved behaviour snapshot is kept as
        ``behaviour_version``; returns whether there was one."""
        src = Path(directory)
        self._snapshots.clear()
        self._live_version = None
        restored = behaviour_version is not None and (src / BEHAVIOUR_FILE).is_file()
        if restored:
            device = self.accelerator.device
            self._snapshots[behaviour_version] = {n: t.to(device) for n, t in torch.load(src / BEHAVIOUR_FILE).items()}
        if self.accelerator.state.deepspeed_plugin is not None:
            # restores the trainable weights (exclude_frozen_parameters) and each rank's optimizer partition
            self.model.load_checkpoint(str(src / "deepspeed"), tag="state", load_module_strict=False,
                                       load_lr_scheduler_states=False)
        else:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.unwrapped.policy, load_file(src / "adapter" / "adapter_model.safetensors"))
            if self.unwrapped.value_head is not None:
                self.unwrapped.value_head.load_state_dict(torch.load(src / "value_head.pt"))
            self.optimizer.load_state_dict(torch.load(src / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(src / "scheduler.pt"))
        rng = torch.load(src / f"rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return restored
