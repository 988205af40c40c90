"""The learner's objective for one micro-batch, from the ``ppo`` config: policy loss (registry) + KL loss term +
value loss, each reduced with ``loss_agg_mode`` so that micro-batches add up to the minibatch loss; and the guard
that keeps a non-finite loss away from the optimizer on every rank. Pure torch (no Ray, no model code).
"""
from __future__ import annotations

import torch

from medrl.ppo.algos import aggregate_loss, kl_estimate, masked_mean, policy_loss, value_loss


def loss_denominators(loss_mask: torch.Tensor, device: torch.device | str = "cpu") -> tuple[float, float]:
    """The denominators of ``aggregate_loss`` for this rank's share of a minibatch: the (tokens, non-empty rows) of
    the minibatch's ``loss_mask`` over all learner ranks, divided by the number of ranks (one all-reduce).

    DDP and DeepSpeed average the ranks' gradients, so a rank whose loss is its token sum over ``global / ranks``
    contributes exactly its share of the global token mean: ranks with unequal token counts weigh every token the
    same, as one rank over the whole minibatch would (veRL's and OpenRLHF's global token count). With one rank:
    this rank's counts, unchanged. ``device``: where the all-reduce runs (this rank's GPU with NCCL)."""
    counts = torch.tensor([float(loss_mask.sum()), float((loss_mask.sum(1) > 0).sum())], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        on_device = counts.to(device)
        torch.distributed.all_reduce(on_device)
        counts = on_device.cpu() / world
    return float(counts[0]), float(counts[1])


def micro_batch_loss(out: dict[str, torch.Tensor], mb, ppo_cfg, kl_coef: float, n_tokens: float,
                     n_seqs: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the minibatch loss and its (detached) statistics. ``out``: the model's
    ``logprobs`` (and ``values``); ``mb``: the rows (a ``medrl.ppo.batch.Batch``: ``old_logprobs``, ``advantages``,
    ``loss_mask``, ``behaviour_weights``, and ``ref_logprobs`` / ``values`` / ``returns`` when used)."""
    mask = mb.loss_mask
    agg = dict(n_tokens=n_tokens, n_seqs=n_seqs,
               norm_len=float(ppo_cfg.loss_norm_len or ppo_cfg.generation.max_new_tokens))
    clip_low = ppo_cfg.clip if ppo_cfg.clip_low is None else ppo_cfg.clip_low
    clip_high = ppo_cfg.clip if ppo_cfg.clip_high is None else ppo_cfg.clip_high
    token_loss, info = policy_loss(ppo_cfg.policy_loss, out["logprobs"], mb.old_logprobs, mb.advantages, mask,
                                   clip_low=clip_low, clip_high=clip_high, dual_clip=ppo_cfg.dual_clip,
                                   behaviour_weights=mb.behaviour_weights)
    loss = aggregate_loss(token_loss, mask, ppo_cfg.loss_agg_mode, **agg)
    info["policy_loss"] = loss.detach()
    if ppo_cfg.kl.placement == "loss" and kl_coef > 0:
        kl = kl_estimate(out["logprobs"], mb.ref_logprobs, ppo_cfg.kl.estimator)
        kl_loss = aggregate_loss(kl, mask, ppo_cfg.loss_agg_mode, **agg)
        loss = loss + kl_coef * kl_loss
        info["kl_loss"] = kl_loss.detach()
        info["kl_live"] = masked_mean(kl.detach(), mask)
    if "values" in out:
        vloss, vinfo = value_loss(out["values"], mb.values, mb.returns, mask, ppo_cfg.value_clip)
        loss = loss + ppo_cfg.vf_coef * vloss * (mask.sum() / max(n_tokens, 1.0))  # token mean over the minibatch
        info.update(vinfo, value_loss=vloss.detach())
    return loss, info


def finite_on_all_ranks(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on this rank and on every other rank of the process group (one all-reduce of a
    flag), so that all ranks take the same branch: a rank that skipped a backward its peers ran would hang them."""
    ok = torch.tensor([float(bool(torch.isfinite(value).all()))], device=value.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item() == 1.0)


def stand_in_loss(out: dict[str, torch.Tensor], poison: bool = False) -> torch.Tensor:
    """A loss connected to the whole graph whose gradient is exactly 0 (or NaN with ``poison``), backed in place of
    a non-finite loss so that every rank still runs the same backward (DDP all-reduce, DeepSpeed's reduce hooks).
    ``poison`` is for DeepSpeed at the accumulation boundary: its step runs inside that backward and discards
    non-finite gradients of all ranks together (its overflow check, on in fp32 and bf16 here), which is how the
    update of the whole minibatch is skipped there."""
    total = sum(v.float().nan_to_num(0.0, 0.0, 0.0).sum() for v in out.values() if v.requires_grad)
    return total * (float("nan") if poison else 0.0)
