"""What the learner minimises: the policy losses (registered by name, ``cfg.ppo.policy_loss``), their reduction to
one number (``aggregate_loss``, ``cfg.ppo.loss_agg_mode``), the value loss, and ``micro_batch_loss``: policy loss +
KL loss term + value loss of one micro-batch, from the ``ppo`` config, so that micro-batches add up to the minibatch
loss; and the guard that keeps a non-finite loss away from the optimizer on every rank. Pure torch (no Ray, no model
code); the estimators and the weights the driver computes before the update are ``medrl.ppo.algos``.
"""
from __future__ import annotations

from typing import Callable

import torch

from medrl.ppo.algos import LOG_RATIO_CLAMP, behaviour_weights, kl_estimate, masked_mean
from medrl.ppo.config import PolicyLossName, check_registry

# --------------------------------------------------------------------------- policy losses (registry)
PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    def deco(fn: PolicyLoss) -> PolicyLoss:
        POLICY_LOSSES[name] = fn
        return fn
    return deco


def policy_loss(name: str, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_low: float, clip_high: float, dual_clip: float | None = None,
                behaviour_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy loss ``[B, T]`` of the registered loss ``name`` (reduce it with ``aggregate_loss``) and
    detached statistics (token means over ``mask``). ``behaviour_weights`` (samples drawn by an older policy): each
    token's loss is multiplied by its weight (decoupled PPO: the ratio is clipped around ``old_logprobs``, the
    proximal policy)."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r} ({', '.join(POLICY_LOSSES)})")
    loss, info = POLICY_LOSSES[name](logprobs, old_logprobs, advantages, mask, clip_low=clip_low,
                                     clip_high=clip_high, dual_clip=dual_clip)
    with torch.no_grad():
        info["approx_kl"] = masked_mean(0.5 * (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) ** 2,
                                        mask)
    return (loss if behaviour_weights is None else behaviour_weights * loss), info


def _clipped_surrogate(ratio, advantages, mask, clip_low, clip_high, dual_clip):
    """``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; with ``dual_clip`` c, tokens with A < 0 are also
    capped at ``-A c`` (Ye et al. 2020: a huge ratio on a bad token cannot make the loss unbounded)."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    info = {"clip_frac": masked_mean((clipped > unclipped).float(), mask).detach()}
    if dual_clip is not None:
        cap = -advantages * dual_clip
        capped = (advantages < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        info["dual_clip_frac"] = masked_mean(capped.float(), mask).detach()
    return loss, info


@register_policy_loss("ppo")
def _ppo(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, dual_clip):
    """PPO's clipped surrogate with a per-token ratio ``pi / pi_old`` (asymmetric: DAPO's clip-higher)."""
    ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return _clipped_surrogate(ratio, advantages, mask, clip_low, clip_high, dual_clip)


@register_policy_loss("gspo")
def _gspo(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, dual_clip):
    """GSPO (Zheng et al. 2025): one ratio per response, the geometric mean ``exp(mean_t log(pi / pi_old))``, clipped
    as PPO's; each token carries it with its own gradient (``sg[s] * pi_t / sg[pi_t]``). Use small clips (the
    paper: 3e-4 / 4e-4)."""
    seq_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach())
    return _clipped_surrogate(ratio, advantages, mask, clip_low, clip_high, dual_clip)


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str, *, n_tokens: torch.Tensor | float,
                   n_seqs: torch.Tensor | float, norm_len: float) -> torch.Tensor:
    """These rows' share of the minibatch loss, so that micro-batches add up to the minibatch value (``n_tokens`` /
    ``n_seqs``: the minibatch's loss tokens and non-empty rows, over all learner ranks divided by their number:
    ``objective.loss_denominators``; veRL's ``loss_agg_mode`` names):

    - ``token-mean``: sum over all tokens / ``n_tokens`` (PPO, DAPO: long responses weigh more);
    - ``seq-mean-token-mean``: each row's token mean, averaged over rows (GRPO paper: every response weighs the
      same, so tokens of long responses weigh less);
    - ``seq-mean-token-sum-norm``: sum over all tokens / (``n_seqs`` x ``norm_len``), a constant length (Dr. GRPO:
      no length bias in either direction)."""
    total = (loss * mask).sum(1)
    if mode == "token-mean":
        return total.sum() / max(float(n_tokens), 1.0)
    if mode == "seq-mean-token-mean":
        return (total / mask.sum(1).clamp(min=1)).sum() / max(float(n_seqs), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return total.sum() / (max(float(n_seqs), 1.0) * norm_len)
    raise ValueError(f"unknown loss aggregation {mode!r} ({', '.join(LOSS_AGG_MODES)})")


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * squared error to the returns, token mean; with ``clip`` the max of the clipped and unclipped error
    (predictions kept within ``old +- clip``, as in PPO2)."""
    err = (values - returns) ** 2
    if clip is None:
        loss = 0.5 * masked_mean(err, mask)
        frac = torch.zeros((), device=values.device)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clipped = (clipped_values - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
        with torch.no_grad():
            frac = masked_mean((err_clipped > err).float(), mask)
    return loss, {"value_clip_frac": frac.detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: ``logsumexp(z) - sum softmax(z) z``."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# --------------------------------------------------------------------------- one micro-batch


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
    ``logprobs`` (and ``values``); ``mb``: the rows (a ``medrl.ppo.batch.Batch``: ``behaviour_logprobs``,
    ``advantages``, ``loss_mask``, and ``old_logprobs`` / ``rollout_weights`` / ``ref_logprobs`` / ``values`` /
    ``returns`` when set). Each token's policy loss is weighted by the decoupled weight ``pi_old / pi_behaviour``
    (truncated at ``ppo.behaviour_weight_cap``; 1 on-policy) times the rollout correction's weight; their mean over
    the loss tokens is reported as ``behaviour_weight_mean``."""
    mask = mb.loss_mask
    agg = dict(n_tokens=n_tokens, n_seqs=n_seqs,
               norm_len=float(ppo_cfg.loss_norm_len or ppo_cfg.generation.max_new_tokens))
    clip_low = ppo_cfg.clip if ppo_cfg.clip_low is None else ppo_cfg.clip_low
    clip_high = ppo_cfg.clip if ppo_cfg.clip_high is None else ppo_cfg.clip_high
    # the proximal policy: the learner's pass before the update, or this forward itself when the update is one
    # optimizer step (``old_logprobs`` None: the weights of this forward are the proximal weights)
    old = out["logprobs"].detach() if mb.old_logprobs is None else mb.old_logprobs
    weights = behaviour_weights(old, mb.behaviour_logprobs, ppo_cfg.behaviour_weight_cap)
    if mb.rollout_weights is not None:
        weights = weights * mb.rollout_weights
    token_loss, info = policy_loss(ppo_cfg.policy_loss, out["logprobs"], old, mb.advantages, mask,
                                   clip_low=clip_low, clip_high=clip_high, dual_clip=ppo_cfg.dual_clip,
                                   behaviour_weights=weights)
    info["behaviour_weight_mean"] = masked_mean(weights, mask)
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


check_registry(POLICY_LOSSES, PolicyLossName, "ppo.policy_loss")
