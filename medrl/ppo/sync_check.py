"""The weight-sync proof run every step: the rollout engine's log-probs of the tokens it sampled against the learner's
recompute of the same tokens under the adapter version that sampled them. No Ray in here.

A max abs gap above ``ppo.logprob_gap_tolerance`` warns (numerics: bf16 kernels, another engine); a mean abs gap
above ``ppo.logprob_gap_abort`` stops the run: the engine sampled with weights other than the version it was sent.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("medrl.ppo")


class WeightSyncError(RuntimeError):
    """The rollout engine did not sample with the adapter version it was told to use."""


def abort_threshold(ppo_cfg, dtype: torch.dtype) -> float:
    """``ppo.logprob_gap_abort``, or its default for the dtype the model runs in."""
    if ppo_cfg.logprob_gap_abort is not None:
        return ppo_cfg.logprob_gap_abort
    return 1e-3 if dtype == torch.float32 else 0.05


def logprob_gaps(rollout_logprobs: torch.Tensor, learner_logprobs: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[float, float]:
    """(max, mean) abs difference over the response tokens (``mask`` 1)."""
    diff = (rollout_logprobs - learner_logprobs).abs() * mask
    return float(diff.max()), float(diff.sum() / mask.sum().clamp(min=1))


def check_weight_sync(step: int, version: int, gap_max: float, gap_mean: float, tolerance: float,
                      abort: float) -> None:
    """Warn above ``tolerance`` (max gap); raise ``WeightSyncError`` naming ``version`` above ``abort`` (mean gap)."""
    if gap_mean > abort:
        raise WeightSyncError(
            f"step {step}: the rollout engine did not sample with adapter version {version}: its log-probs differ "
            f"from the learner's by {gap_mean:.2e} per token on average (max {gap_max:.2e}; ppo.logprob_gap_abort "
            f"{abort:.0e})")
    if gap_max > tolerance:
        log.warning("step %d: rollout vs learner log-prob gap %.2e > tolerance %.0e (weight sync or numerics)",
                    step, gap_max, tolerance)

