"""The RL math the driver runs over the whole batch before the update, as pure tensor functions (no Ray, no model
code): which rows learn (``rows_to_learn``), their KL, advantages, returns and weights (``advantages_and_weights``),
each ``Batch -> Batch``. The losses the learner minimises are ``medrl.ppo.objective``.

Shapes: ``[B, T]`` tensors hold one row per response, right padded; ``mask`` is 1 on response tokens and 0 on
padding. Advantage estimators are registered by name (veRL style) and share one signature, so the driver picks
one from ``cfg.ppo.estimator`` without knowing which.

Guards: log-ratios are clamped to +-``LOG_RATIO_CLAMP`` before ``exp`` (veRL's ``SAFETY_BOUND`` is also 20) and
per-token KL estimates of every estimator to +-``KL_CLAMP`` (as OpenRLHF's ``compute_approx_kl`` does for k1, k2 and
k3; veRL's ``kl_penalty`` clamps only k3, its ``low_var_kl``), so a policy that drifted far from the old or reference
policy gives a large, finite loss.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from medrl.ppo.batch import Batch
from medrl.ppo.config import EstimatorName, check_registry

EPS = 1e-8
LOG_RATIO_CLAMP = 20.0
"""|log pi - log pi_old| is clamped here before ``exp`` (exp(20) ~ 4.9e8: finite in fp32 and bf16)."""
KL_CLAMP = 10.0
"""Per-token KL estimates (k1, k2 and k3 alike) are clamped to +-this (k3 of a log-ratio of -100 would be
~e^100; k1 and k2 are bounded by ``LOG_RATIO_CLAMP`` already, the clamp at 10 is OpenRLHF's)."""
ZERO_SPREAD_RTOL = 1e-6
"""A group whose scores differ by at most this times their largest magnitude has zero spread: it carries no
signal, its group-baselined advantages are exactly 0, and ``ppo.filter_zero_spread_groups`` drops it."""


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
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi (Schulman's k1/k2/k3), the
    log-ratio clamped to +-``LOG_RATIO_CLAMP`` and the estimate to +-``KL_CLAMP``."""
    log_ratio = torch.clamp(logprobs - ref_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio ** 2
    elif kind == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")
    return torch.clamp(kl, -KL_CLAMP, KL_CLAMP)


def token_rewards(scores: torch.Tensor, kl_penalty: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards ``-kl_penalty_t`` (= ``-kl_coef * KL_t``) with the sequence score added on the last
    response token (the last token of the mask: a consultation's last policy token)."""
    rewards = -kl_penalty * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * (mask > 0)).amax(1)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * (mask.sum(1) > 0)
    return rewards


# --------------------------------------------------------------------------- weights of off-policy samples
def behaviour_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token importance weights pi_old / pi_behaviour of samples drawn by an older policy, truncated at ``cap``
    (decoupled PPO, Hilton et al. 2021; truncated IS as in Yao et al. 2025): 1 where the two policies agree."""
    return torch.exp(old_logprobs - behaviour_logprobs).clamp(max=cap)


def rollout_correction(behaviour_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                       settings) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Importance weights of the rollout/learner mismatch, ``rho = pi_learner(theta_b) / pi_engine(theta_b)`` from
    the learner's ``behaviour_logprobs`` and the engine's ``rollout_logprobs`` of the same sampled tokens, per
    ``settings`` (``ppo.rollout_correction``). Returns ``(weights, keep, stats)``: ``weights [B, T]`` to multiply
    into the per-token policy loss (1 with mode ``none``), ``keep [B, T]`` the tokens left in the loss (``mis``
    drops the rest; 1 otherwise), and the step's statistics over the response tokens: ``rollout_kl`` (k3 estimate of
    KL(engine || learner)), ``rollout_is_mean`` / ``rollout_is_max`` of rho (per token, or per response at sequence
    level) and ``rollout_is_clipped_frac`` (``tis``) or ``rollout_is_masked_frac`` (``mis``) of those units."""
    log_rho = torch.clamp(behaviour_logprobs - rollout_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * mask
    if settings.level == "sequence":  # geometric mean of the token ratios, one per response
        rows = mask.sum(1) > 0
        rho = torch.exp(masked_mean(log_rho, mask, dim=1))[:, None].expand_as(mask)
        units, unit_mask = rho[:, 0], rows.to(mask.dtype)
    else:
        rho = torch.exp(log_rho)
        units, unit_mask = rho, mask
    has_units = bool(unit_mask.sum() > 0)
    stats = {"rollout_kl": float(masked_mean(kl_estimate(rollout_logprobs, behaviour_logprobs, "k3"), mask)),
             "rollout_is_mean": float(masked_mean(units, unit_mask)),
             "rollout_is_max": float(units[unit_mask.bool()].max()) if has_units else 1.0}
    keep = torch.ones_like(mask)
    if settings.mode == "none":
        return torch.ones_like(mask), keep, stats
    if settings.mode == "tis":
        stats["rollout_is_clipped_frac"] = float(masked_mean((units > settings.cap).to(mask.dtype), unit_mask))
        return rho.clamp(max=settings.cap) * mask, keep, stats
    if settings.mode == "mis":
        inside = ((rho >= settings.low) & (rho <= settings.high)).to(mask.dtype)
        stats["rollout_is_masked_frac"] = float(masked_mean(1.0 - (inside[:, 0] if settings.level == "sequence"
                                                                   else inside), unit_mask))
        return rho * inside * mask, inside, stats
    raise ValueError(f"unknown rollout correction mode {settings.mode!r} (none, tis, mis)")


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


class GroupStats(NamedTuple):
    """Per-row statistics of the row's group, in fp64 (``centred`` = score - group mean)."""

    mean: torch.Tensor
    std: torch.Tensor
    size: torch.Tensor
    centred: torch.Tensor
    zero_spread: torch.Tensor
    """True where the group's scores are all equal (within ``ZERO_SPREAD_RTOL``)."""


def group_stats(scores: torch.Tensor, group: torch.Tensor) -> GroupStats:
    """Mean, unbiased std and size of each row's group, computed in fp64: in fp32 the mean of equal scores can land
    one ulp away from them, and dividing that residue by a ~1e-7 std gave a whole group the same non-zero advantage.
    Zero-spread groups are flagged so that estimators return an exact 0 for them."""
    s = scores.double()
    ids, inverse = torch.unique(group, return_inverse=True)
    size = torch.zeros(len(ids), dtype=s.dtype, device=s.device).index_add_(0, inverse, torch.ones_like(s))
    mean = (torch.zeros_like(size).index_add_(0, inverse, s) / size)[inverse]
    centred = s - mean
    std = torch.sqrt(torch.zeros_like(size).index_add_(0, inverse, centred ** 2) / (size - 1).clamp(min=1))[inverse]
    hi = torch.full_like(size, -torch.inf).scatter_reduce(0, inverse, s, "amax")
    lo = torch.full_like(size, torch.inf).scatter_reduce(0, inverse, s, "amin")
    zero = (hi - lo) <= ZERO_SPREAD_RTOL * torch.maximum(hi.abs(), lo.abs())
    return GroupStats(mean, std, size[inverse], centred, zero[inverse])


def _baselined(stats: GroupStats, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` where the group has two or more rows and a non-zero spread, exactly 0 elsewhere."""
    signal = (stats.size > 1) & ~stats.zero_spread
    return torch.where(signal, value, torch.zeros_like(value)).to(dtype)


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
    """GRPO (Shao et al. 2024): score normalised within its group, ``(r - mean_g) / (std_g + eps)``; a group of one,
    or one whose scores are all equal, gets exactly 0 (so do ``dr_grpo`` and ``rloo``)."""
    st = group_stats(scores, group)
    return _outcome_advantages(_baselined(st, st.centred / (st.std + 1e-6), scores.dtype), kl_penalty, mask, gamma)


@register_estimator("dr_grpo")
def _dr_grpo(*, scores, kl_penalty, mask, group, values, gamma, lam, whiten):
    """Dr. GRPO (Liu et al. 2025): the group mean subtracted, no division by the std (which up-weights prompts that
    are nearly always right or wrong); pair it with ``loss_agg_mode=seq-mean-token-sum-norm``."""
    st = group_stats(scores, group)
    return _outcome_advantages(_baselined(st, st.centred, scores.dtype), kl_penalty, mask, gamma)


@register_estimator("rloo")
def _rloo(*, scores, kl_penalty, mask, group, values, gamma, lam, whiten):
    """RLOO (Ahmadian et al. 2024): baseline = mean of the other samples of the group,
    ``r_i - (sum_g - r_i) / (n - 1) = n / (n - 1) * (r_i - mean_g)``; a group of one gets 0."""
    st = group_stats(scores, group)
    seq_adv = _baselined(st, st.centred * st.size / (st.size - 1).clamp(min=1), scores.dtype)
    return _outcome_advantages(seq_adv, kl_penalty, mask, gamma)


@register_estimator("reinforce_pp")
def _reinforce_pp(*, scores, kl_penalty, mask, group, values, gamma, lam, whiten):
    """REINFORCE++ (Hu 2025): reward-to-go of the KL-penalised token rewards, whitened over the whole batch."""
    returns = discounted_returns(token_rewards(scores, kl_penalty, mask), mask, gamma)
    return masked_whiten(returns, mask), returns


# --------------------------------------------------------------------------- the driver's Batch -> Batch steps
def num_minibatches(n_samples: int, ppo_cfg) -> int:
    """Optimizer steps per epoch for a batch of ``n_samples`` (the same on every rank)."""
    per_rank = n_samples // ppo_cfg.learner.ranks
    return max(1, min(-(-n_samples // ppo_cfg.minibatch_size), per_rank))


def proximal_pass_needed(n_samples: int, ppo_cfg) -> bool:
    """Whether the proximal log-probs of a batch of ``n_samples`` (the live weights before the update) need a forward
    pass of their own. Not when the update is one optimizer step (``ppo_epochs`` 1, one minibatch: fewer rows left
    after filtering cannot make more) and there is no critic: the training forward runs at exactly those weights,
    and its log-probs, detached, are the proximal ones (the ratio is 1, as in trl's GRPO with ``num_iterations=1``).
    That saves one forward pass per step of stale samples (``async_rollout``); on-policy samples need the pass anyway,
    as the behaviour log-probs of the weight-sync check."""
    return ppo_cfg.ppo_epochs > 1 or num_minibatches(n_samples, ppo_cfg) > 1 or ppo_cfg.uses_critic


def rows_to_learn(batch: Batch, ppo_cfg, ranks: int) -> tuple[Batch, dict[str, float]]:
    """The rows a step learns from: not ``dropped`` by the reward plane, minus the groups whose ``scores`` have zero
    spread when ``ppo.filter_zero_spread_groups`` is on, cut to a multiple of ``ranks`` (equal shards); no rows: the
    update is skipped. Counts the zero-spread groups among the scored rows either way (DAPO's dynamic-sampling
    statistic)."""
    scored = [i for i, d in enumerate(batch.dropped.tolist()) if not d]
    stats = {"zero_spread_groups": 0, "zero_spread_frac": 0.0}
    if scored:
        idx = torch.tensor(scored)
        zero = group_stats(batch.scores[idx], batch.group[idx]).zero_spread
        flat, groups = torch.unique(batch.group[idx][zero]), torch.unique(batch.group[idx])
        stats = {"zero_spread_groups": int(flat.numel()), "zero_spread_frac": flat.numel() / groups.numel()}
        if ppo_cfg.filter_zero_spread_groups:
            scored = [i for i, z in zip(scored, zero.tolist()) if not z]
    keep = scored[:len(scored) - len(scored) % ranks]
    return (batch if len(keep) == len(batch) else batch.take(torch.tensor(keep, dtype=torch.long))), stats


def advantages_and_weights(ppo_cfg, batch: Batch, kl_coef: float) -> tuple[Batch, dict[str, float]]:
    """The batch with what the PPO update needs beyond the log-probs, over the whole batch (group and batch
    statistics): per-token ``kl`` of the behaviour policy (the weights that drew the samples; ``ppo.kl.estimator``,
    0 without ``ref_logprobs``, i.e. a zero coefficient), ``advantages`` and ``returns`` of the configured estimator
    with ``scores`` on the last token (plus per-token rewards ``-kl_coef * KL_t`` when ``kl.placement`` is
    ``reward``), ``rollout_weights``: the rollout correction's weight of ``pi_behaviour / pi_engine``
    (``rollout_correction``, from ``rollout_logprobs``; None with mode ``none``), and ``loss_mask``: the response
    tokens the losses see (``ppo.mask_truncated`` removes the responses not ``finished``, mode ``mis`` the tokens or
    responses outside its band); all 0 on padding. The decoupled weight ``pi_old / pi_behaviour`` is the loss's
    (``objective.micro_batch_loss``): the proximal log-probs may come from the training forward itself. Also returns
    batch statistics (``kl``: the mean per-token KL over the tokens that exist, what the adaptive controller steers;
    absent without a reference; the rollout correction's)."""
    mask, behaviour, ref_logprobs = batch.response_mask, batch.behaviour_logprobs, batch.ref_logprobs
    kl = torch.zeros_like(mask) if ref_logprobs is None else kl_estimate(behaviour, ref_logprobs,
                                                                         ppo_cfg.kl.estimator) * mask
    in_reward = kl_coef * kl if ppo_cfg.kl.placement == "reward" else torch.zeros_like(kl)
    advantages, returns = compute_advantages(
        ppo_cfg.estimator, scores=batch.scores.float(), kl_penalty=in_reward, mask=mask, group=batch.group,
        values=batch.values, gamma=ppo_cfg.gamma, lam=ppo_cfg.lam, whiten=ppo_cfg.whiten_advantages)
    correction, keep, rc_stats = rollout_correction(behaviour, batch.rollout_logprobs, mask,
                                                    ppo_cfg.rollout_correction)
    masked = ~batch.finished.bool() & ppo_cfg.mask_truncated
    stats = {"advantage_mean": float(masked_mean(advantages, mask)), "return_mean": float(masked_mean(returns, mask)),
             "truncated_masked": int(masked.sum()), **rc_stats}
    if ref_logprobs is not None:
        stats.update(kl=float(masked_mean(kl, mask)), kl_seq_sum=float((kl * mask).sum(1).mean()))
    if batch.values is not None:
        stats["value_mean"] = float(masked_mean(batch.values, mask))
    rollout_weights = None if ppo_cfg.rollout_correction.mode == "none" else correction
    return batch.replace(kl=kl, advantages=advantages * mask, returns=returns * mask, rollout_weights=rollout_weights,
                         loss_mask=mask * (~masked).to(mask.dtype)[:, None] * keep), stats


check_registry(ADVANTAGE_ESTIMATORS, EstimatorName, "ppo.estimator")
