"""The RL math of medrl, as pure tensor functions (no Ray, no model code).

Shapes: ``[B, T]`` tensors hold one row per response, right padded; ``mask`` is 1 on response tokens and 0 on
padding. Advantage estimators are registered by name (veRL style) and share one signature, so the driver picks
one from ``cfg.ppo.estimator`` without knowing which.
"""
from __future__ import annotations

from typing import Callable

import torch

EPS = 1e-8


# --------------------------------------------------------------------------- masked statistics
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where ``mask`` is 1 (0 where there is no such position)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions; ``shift_mean=False`` only rescales (keeps the mean)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + EPS)
    if not shift_mean:
        out = out + mean
    return out * mask


# --------------------------------------------------------------------------- returns
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` per row, 0 on padding."""
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running  # right padding: 0 until the last real token
        out[:, t] = running
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016). The value after the last response token is 0.

    ``delta_t = r_t + gamma V_{t+1} - V_t``; ``A_t = delta_t + gamma lam A_{t+1}``; returns = A + V."""
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]  # 0 on the right padding, so the last response token bootstraps from 0
    return advantages, (advantages + values) * mask


# --------------------------------------------------------------------------- KL
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi (Schulman's k1/k2/k3)."""
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")


def token_rewards(scores: torch.Tensor, kl_penalty: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards ``-kl_penalty_t`` (= ``-kl_coef * KL_t``) with the sequence score added on the last
    response token."""
    rewards = -kl_penalty * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * (mask.sum(1) > 0)
    return rewards


# --------------------------------------------------------------------------- losses
def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float, behaviour_weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, token mean. Returns the loss and (detached) clip fraction and approximate KL.
    ``behaviour_weights`` (samples drawn by an older policy): each token's surrogate is multiplied by its weight
    (decoupled PPO: the ratio is clipped around ``old_logprobs``, the proximal policy)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    surrogate = torch.maximum(unclipped, clipped)
    loss = masked_mean(surrogate if behaviour_weights is None else behaviour_weights * surrogate, mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


def behaviour_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token importance weights pi_old / pi_behaviour of samples drawn by an older policy, truncated at ``cap``
    (decoupled PPO, Hilton et al. 2021; truncated IS as in Yao et al. 2025): 1 where the two policies agree."""
    return torch.exp(old_logprobs - behaviour_logprobs).clamp(max=cap)


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


# --------------------------------------------------------------------------- advantage estimators
Estimator = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    def deco(fn: Estimator) -> Estimator:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return deco


def compute_advantages(name: str, *, scores: torch.Tensor, kl_penalty: torch.Tensor, mask: torch.Tensor,
                       group: torch.Tensor, values: torch.Tensor | None = None, gamma: float = 1.0,
                       lam: float = 0.95, whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the estimator ``name``. Inputs: ``scores [B]`` sequence rewards, ``kl_penalty [B, T]`` the
    per-token ``kl_coef * KL_t``, ``mask [B, T]``, ``group [B]`` the prompt index of each row (rows of one prompt
    form a group), ``values [B, T]`` (gae only). Returns ``(advantages, returns)``, both ``[B, T]``."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r} ({', '.join(ADVANTAGE_ESTIMATORS)})")
    return ADVANTAGE_ESTIMATORS[name](scores=scores, kl_penalty=kl_penalty, mask=mask, group=group, values=values,
                                      gamma=gamma, lam=lam, whiten=whiten)


def _group_stats(scores: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row mean, unbiased std and size of the row's group."""
    ids, inverse = torch.unique(group, return_inverse=True)
    size = torch.zeros(len(ids), dtype=scores.dtype, device=scores.device).index_add_(0, inverse,
                                                                                      torch.ones_like(scores))
    total = torch.zeros_like(size).index_add_(0, inverse, scores)
    mean = total / size
    sq = torch.zeros_like(size).index_add_(0, inverse, (scores - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (size - 1).clamp(min=1))
    return mean[inverse], std[inverse], size[inverse]


def _outcome_advantages(seq_adv: torch.Tensor, kl_penalty: torch.Tensor, mask: torch.Tensor,
                        gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token advantages = reward-to-go of ``-kl_penalty`` plus the baselined sequence score on the last token."""
    returns = discounted_returns(token_rewards(seq_adv, kl_penalty, mask), mask, gamma)
    return returns, returns


@register_estimator("gae")
def _gae(*, scores, kl_penalty, mask, group, values, gamma, lam, whiten):
    if values is None:
        raise ValueError("the gae estimator needs values (a value head)")
    rewards = token_rewards(scores, kl_penalty, mask)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


@register_estimator("grpo")
def _grpo(*, scores, kl_penalty, mask, group, values, gamma, lam, whiten):
    """GRPO (Shao et al. 2024): score normalised within its group, ``(r - mean_g) / (std_g + eps)``; a group of one
    gets 0."""
    mean, std, size = _group_stats(scores, group)
    seq_adv = torch.where(size > 1, (scores - mean) / (std + 1e-6), torch.zeros_like(scores))
    return _outcome_advantages(seq_adv, kl_penalty, mask, gamma)


@register_estimator("rloo")
def _rloo(*, scores, kl_penalty, mask, group, values, gamma, lam, whiten):
    """RLOO (Ahmadian et al. 2024): baseline = mean of the other samples of the group,
    ``r_i - (sum_g - r_i) / (n - 1) = n / (n - 1) * (r_i - mean_g)``; a group of one gets 0."""
    mean, _, size = _group_stats(scores, group)
    seq_adv = torch.where(size > 1, (scores - mean) * size / (size - 1).clamp(min=1), torch.zeros_like(scores))
    return _outcome_advantages(seq_adv, kl_penalty, mask, gamma)


@register_estimator("reinforce_pp")
def _reinforce_pp(*, scores, kl_penalty, mask, group, values, gamma, lam, whiten):
    """REINFORCE++ (Hu 2025): reward-to-go of the KL-penalised token rewards, whitened over the whole batch."""
    returns = discounted_returns(token_rewards(scores, kl_penalty, mask), mask, gamma)
    return masked_whiten(returns, mask), returns


# --------------------------------------------------------------------------- the driver's finishing step
def advantages_and_weights(ppo_cfg, *, scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor,
                           old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                           behaviour_logprobs: torch.Tensor, values: torch.Tensor | None, kl_coef: float
                           ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """What the PPO update needs beyond the log-probs, over the whole batch (group and batch statistics): per-token
    ``kl`` (``ppo.kl.estimator``), ``advantages`` and ``returns`` of the configured estimator on per-token rewards
    ``-kl_coef * KL_t`` with ``scores [B]`` on the last token, and the truncated ``behaviour_weights``
    ``pi_old / pi_behaviour``; all 0 on padding. Also returns batch statistics."""
    kl = kl_estimate(old_logprobs, ref_logprobs, ppo_cfg.kl.estimator) * mask
    advantages, returns = compute_advantages(
        ppo_cfg.estimator, scores=scores.float(), kl_penalty=kl_coef * kl, mask=mask, group=group, values=values,
        gamma=ppo_cfg.gamma, lam=ppo_cfg.lam, whiten=ppo_cfg.whiten_advantages)
    weights = behaviour_weights(old_logprobs, behaviour_logprobs, ppo_cfg.behaviour_weight_cap)
    stats = {"behaviour_weight_mean": float(masked_mean(weights, mask)),
             "kl": float(masked_mean(kl, mask, dim=1).mean()), "kl_seq_sum": float((kl * mask).sum(1).mean()),
             "advantage_mean": float(masked_mean(advantages, mask)), "return_mean": float(masked_mean(returns, mask))}
    if values is not None:
        stats["value_mean"] = float(masked_mean(values, mask))
    return {"kl": kl, "advantages": advantages * mask, "returns": returns * mask,
            "behaviour_weights": weights * mask}, stats
