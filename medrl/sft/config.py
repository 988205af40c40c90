"""Config of the ``sft`` stage (owned by medrl.sft), TRL ``SFTConfig``-style.

The LoRA shape (``model.lora``), gradient checkpointing (``model.gradient_checkpointing``), dtype and the system
prompt live in the ``model`` section because RL shares them. Defaults suit Qwen3-1.7B on one 16 GB GPU.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from medrl.config_base import StrictModel


class SFTConfig(StrictModel):
    # ---- length of training
    num_train_epochs: float = Field(2.0, gt=0)
    """Passes over the train split; ignored when ``max_steps`` > 0."""
    max_steps: int = -1
    """Optimizer steps to train for; -1: use ``num_train_epochs``."""

    # ---- batch
    per_device_train_batch_size: int = Field(4, ge=1)
    """Sequences per process per micro-batch."""
    per_device_eval_batch_size: int = Field(4, ge=1)
    """Sequences per process per batch of the dev loss."""
    gradient_accumulation_steps: int = Field(4, ge=1)
    """Micro-batches per optimizer step. Global batch = per_device_train_batch_size x this x num_processes."""
    max_seq_len: int = Field(2048, ge=16)
    """Prompt + completion tokens kept per example (the end is cut; cut examples are counted and reported, examples
    whose whole completion falls past the limit are dropped)."""

    # ---- optimizer and schedule (AdamW, torch implementation)
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate of the LoRA weights."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "cosine"
    """Learning-rate schedule after warm-up (transformers scheduler names)."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of the total steps spent warming the learning rate up linearly from 0."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay of the LoRA weights."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (global L2 norm)."""

    # ---- evaluation, logging, checkpoints
    logging_steps: int = Field(10, ge=1)
    """Log train loss, learning rate and grad norm every N optimizer steps (metrics.jsonl + TensorBoard)."""
    eval_steps: int = Field(50, ge=1)
    """Compute the loss on the dev split every N optimizer steps (and once at the end)."""
    max_eval_samples: int | None = Field(200, ge=1)
    """Cap on dev examples used for the eval loss (the first N); None: all of dev."""
    save_steps: int = Field(100, ge=1)
    """Write a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) every N optimizer steps."""
    save_total_limit: int | None = Field(2, ge=1)
    """Keep only the newest N checkpoints; None: keep all."""

    # ---- distributed
    deepspeed: str | None = None
    """None (plain PyTorch / DDP) or a DeepSpeed JSON config, e.g. ``configs/deepspeed/zero2.json``, ``zero3.json``,
    ``zero3_offload.json``. Its ``"auto"`` values are filled from this section."""
    num_processes: int = Field(1, ge=1)
    """Data-parallel processes (one per GPU). > 1: ``medrl sft`` launches itself with ``torchrun`` (on 127.0.0.1 for
    a single machine; gloo on CPU, NCCL on GPU). Under an external launcher (``torchrun``/``accelerate launch``) the
    launcher's world size wins."""
