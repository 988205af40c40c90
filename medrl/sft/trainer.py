"""``medrl sft``: LoRA supervised fine-tuning with TRL's ``SFTTrainer`` (accelerate, optionally DeepSpeed, underneath).

Single process by default; ``sft.num_processes`` > 1 relaunches the stage under ``torchrun`` (see
``medrl.sft.launch``; each rank runs ``python -m medrl.sft.trainer``), and an external ``torchrun``/``accelerate
launch`` works too: every rank runs ``train_sft``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from medrl.config import Config, load_config, save_config
from medrl.errors import UsageError
from medrl.models.card import finish_adapter
from medrl.models.loading import lora_config, load_causal_lm, load_tokenizer, pick_device, pick_dtype
from medrl.runs import MetricsLogger, RunDir, setup_logging
from medrl.sft.data import encode_example, length_stats, read_records
from medrl.sft.launch import launch_workers

log = logging.getLogger("medrl.sft")

# Trainer log keys -> our metric names (others pass through unchanged)
_RENAME = {"loss": "train_loss", "learning_rate": "lr", "train_loss": "mean_train_loss"}


class MetricsCallback(TrainerCallback):
    """Mirrors the trainer's logs (train loss, lr, grad norm, eval loss...) to ``MetricsLogger`` on the main
    process and adds the wall time per optimizer step since the previous train log."""

    def __init__(self, metrics: MetricsLogger | None):
        self.metrics = metrics
        self._last: tuple[int, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (state.global_step, time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.metrics is None or not logs:
            return
        row = {_RENAME.get(k, k): v for k, v in logs.items()}
        if "train_loss" in row and self._last is not None and state.global_step > self._last[0]:
            now = time.perf_counter()
            row["step_time_s"] = round((now - self._last[1]) / (state.global_step - self._last[0]), 4)
            self._last = (state.global_step, now)
        self.metrics.log(state.global_step, row)


def _dataset(tokenizer, system_prompt: str, path: Path, limit: int | None = None):
    from datasets import Dataset

    records = read_records(path)[:limit]
    examples = [encode_example(tokenizer, system_prompt, r) for r in records]
    return Dataset.from_list(examples) if examples else None, examples


def _resolve_resume(resume: str | None, run: RunDir) -> str | None:
    ckpt_dir = run.checkpoints("sft")
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if resume is None:
        if last is not None:
            raise UsageError(f"{ckpt_dir} holds checkpoints of an earlier SFT run: pass --resume auto to continue "
                             f"from {Path(last).name}, or delete the directory to start over")
        return None
    if resume == "auto":
        log.info("resume=auto: %s", f"continuing from {last}" if last else "no checkpoint yet, starting fresh")
        return last
    if not (Path(resume) / "trainer_state.json").is_file():
        raise UsageError(f"--resume {resume}: not a checkpoint directory (no trainer_state.json); use 'auto' or a "
                         f"{run.checkpoints('sft')}/checkpoint-N directory")
    return str(resume)


def _check_deepspeed_file(path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"sft.deepspeed: file not found: {path} (try configs/deepspeed/zero2.json)")


def training_args(cfg: Config, run: RunDir, has_eval: bool):
    """TRL ``SFTConfig`` (TrainingArguments) from our config: bf16 on GPU, fp32 on CPU, loss on completions only."""
    from trl import SFTConfig as TrlSFTConfig

    s = cfg.sft
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    _check_deepspeed_file(s.deepspeed)
    if s.deepspeed and "LOCAL_RANK" not in os.environ:
        raise UsageError("sft.deepspeed runs under a launcher: use `medrl sft` (it starts torchrun) or torchrun / "
                         "accelerate launch")
    if s.deepspeed and device == "cpu" and torch.cuda.is_available():
        raise UsageError("sft.deepspeed with model.device=cpu on a GPU machine: hide the GPUs "
                         "(CUDA_VISIBLE_DEVICES=) or set model.device=cuda")
    accelerator_config = None
    if s.deepspeed and device == "cpu":
        # accelerate's CPU mode would silently drop DeepSpeed, and without a backend it reports one process per
        # rank: set up the DeepSpeed state over gloo ourselves and let the trainer reuse it (see STACK.md)
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        accelerator_config = {"use_configured_state": True}
    return TrlSFTConfig(
        output_dir=str(run.checkpoints("sft")),
        num_train_epochs=s.num_train_epochs, max_steps=s.max_steps,
        per_device_train_batch_size=s.per_device_train_batch_size,
        per_device_eval_batch_size=s.per_device_eval_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler_type, warmup_steps=s.warmup_ratio,
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, optim="adamw_torch",
        max_length=s.max_seq_len, completion_only_loss=True,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        logging_steps=s.logging_steps, logging_first_step=True,
        eval_strategy="steps" if has_eval else "no", eval_steps=s.eval_steps,
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        deepspeed=s.deepspeed, accelerator_config=accelerator_config,
        use_cpu=device == "cpu" and not s.deepspeed,
        ddp_backend="gloo" if device == "cpu" and "LOCAL_RANK" in os.environ else None,
        seed=cfg.run.seed, data_seed=cfg.run.seed, dataloader_num_workers=0,
        report_to="none",  # MetricsCallback sends the logs to run.report_to: one writer per tracker for all stages
    )


def train_sft(cfg: Config, run: RunDir, *, resume: str | None = None,
              callbacks: Sequence[TrainerCallback] = ()):
    """Train the LoRA adapter on every rank; the main process writes the adapter, tokenizer and config into
    ``run.sft_adapter``. Returns the ``SFTTrainer`` (its ``model`` is the trained ``PeftModel``)."""
    from trl import SFTTrainer

    # DeepSpeed calls torch's deprecated collective names on every step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    train_path, dev_path = run.data / "train.jsonl", run.data / "dev.jsonl"
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.cache_dir)
    train_ds, train_examples = _dataset(tokenizer, cfg.model.system_prompt, train_path)
    if train_ds is None:
        raise UsageError(f"{train_path} has no rows: nothing to train on")
    eval_ds, eval_examples = _dataset(tokenizer, cfg.model.system_prompt, dev_path, cfg.sft.max_eval_samples)
    resume_from = _resolve_resume(resume, run)
    args = training_args(cfg, run, has_eval=eval_ds is not None)

    # load on CPU in the training dtype; the trainer places it on this rank's device
    dtype = pick_dtype(cfg.model.dtype, pick_device(cfg.model.device))
    model = load_causal_lm(cfg.model.path, dtype=str(dtype).removeprefix("torch."), device="cpu",
                           cache_dir=cfg.model.cache_dir)
    metrics = MetricsLogger(run, "sft") if args.process_index == 0 else None
    if metrics is not None:
        metrics.log_hparams(cfg.to_dict())
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=lora_config(cfg.model.lora),
                         callbacks=[MetricsCallback(metrics), *callbacks])
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if trainer.accelerator.num_processes != world:
        raise RuntimeError(f"accelerate sees {trainer.accelerator.num_processes} processes but torch.distributed has "
                           f"{world}: launch with torchrun or `accelerate launch` (not --cpu) so all ranks join")
    lengths = {**length_stats(train_examples, cfg.sft.max_seq_len).as_metrics("train"),
               **length_stats(eval_examples, cfg.sft.max_seq_len).as_metrics("dev")}
    if metrics is not None:
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        metrics.log(0, {**lengths, "trainable_params": n_train, "world_size": world,
                        "num_processes": trainer.accelerator.num_processes,
                        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * world})
        log.info("SFT on %d examples (%d truncated at %d tokens, %d dropped), dev %d; %d trainable LoRA params; "
                 "%d process(es)%s", lengths["train_examples"], lengths["train_truncated"], cfg.sft.max_seq_len,
                 lengths["train_dropped"], lengths["dev_examples"], n_train, world,
                 f", DeepSpeed {cfg.sft.deepspeed}" if cfg.sft.deepspeed else "")
        if lengths["train_truncated"]:
            log.warning("%d of %d train examples exceed sft.max_seq_len=%d and are cut (longest: %d tokens)",
                        lengths["train_truncated"], lengths["train_examples"], cfg.sft.max_seq_len,
                        lengths["train_max_tokens"])
    try:
        trainer.train(resume_from_checkpoint=resume_from)  # also evaluates and checkpoints after the last step
        trainer.save_model(str(run.sft_adapter))  # adapter + tokenizer, main process only (gathers under ZeRO-3)
        if world > 1:
            diff = replica_max_abs_diff(trainer)
            if metrics is not None:
                metrics.log(trainer.state.global_step, {"replica_max_abs_diff": diff})
            if diff > 0:
                raise RuntimeError(f"LoRA weights differ across ranks after training (max |diff| {diff:g})")
        if trainer.is_world_process_zero():
            save_config(cfg, run.sft_adapter / "medrl_config.yaml")
            finish_adapter(cfg, run, "sft", trainer.processing_class)
            log.info("SFT adapter written to %s", run.sft_adapter)
    finally:
        if metrics is not None:
            metrics.close()
    return trainer


def replica_max_abs_diff(trainer) -> float:
    """Largest |weight difference| of the trainable parameters between this job's ranks and rank 0 (collective)."""
    import torch.distributed as dist

    params = [p for p in trainer.model.parameters() if p.requires_grad]
    gathered = _gathered_if_zero3(trainer, params)
    with gathered:
        flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _gathered_if_zero3(trainer, params):
    import contextlib

    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def run_sft(cfg: Config, run: RunDir, *, resume: str | None = None) -> Path:
    """The ``medrl sft`` / pipeline entry point: trains (in this process, or in ``sft.num_processes`` torchrun
    workers) and returns the adapter directory."""
    if int(os.environ.get("RANK", "0")) == 0:  # under an external launcher every rank runs this
        run.record_stage(cfg, "sft")
    # DeepSpeed always runs under a launcher (one rank is a world of one), so the parent process stays clean
    if (cfg.sft.num_processes > 1 or cfg.sft.deepspeed) and "LOCAL_RANK" not in os.environ:
        # bad input fails here, with one line, rather than in every worker
        for split in ("train.jsonl", "dev.jsonl"):
            read_records(run.data / split)
        _resolve_resume(resume, run)
        _check_deepspeed_file(cfg.sft.deepspeed)
        launch_workers(cfg, run, resume=resume)
    else:
        train_sft(cfg, run, resume=resume)
    return run.sft_adapter


def main(argv: list[str] | None = None) -> int:
    """One rank: ``python -m medrl.sft.trainer --config runs/<name>/sft/launch_config.yaml [--resume auto]``."""
    parser = argparse.ArgumentParser(prog="medrl.sft.trainer")
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config)
        run = RunDir.from_config(cfg)
        setup_logging(run if rank == 0 else None, level=logging.INFO if rank == 0 else logging.WARNING)
        train_sft(cfg, run, resume=args.resume)
    except UsageError as exc:
        print(f"medrl: error (rank {rank}): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
