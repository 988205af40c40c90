"""The experience maker: generated samples -> token tensors -> old/ref log-probs and values (learner side) ->
KL-penalised per-token rewards and advantages (driver side, through the estimator registry). No Ray in here.

A batch is a dict of tensors, one row per response:
  ``input_ids``, ``attention_mask`` ``[B, L]``: prompt + response, right padded;
  ``prompt_lens`` ``[B]``; ``response_ids``, ``response_mask`` ``[B, R]``: the response alone, right padded;
  later ``rollout_logprobs``, ``old_logprobs``, ``behaviour_logprobs``, ``ref_logprobs``, ``values``, ``kl``,
  ``advantages``, ``returns``, ``behaviour_weights`` ``[B, R]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medrl.ppo.algos import behaviour_weights, compute_advantages, kl_estimate, masked_mean

SEQUENCE_KEYS = ("input_ids", "attention_mask")


@dataclass
class Sample:
    """One sampled response, as a rollout actor returns it."""

    prompt_index: int
    """Position of the prompt in this step's prompt list (samples of one prompt form a GRPO/RLOO group)."""
    sample_index: int
    """Which of the ``samples_per_prompt`` responses of that prompt."""
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool
    logprobs: list[float] = field(default_factory=list)
    """The rollout actor's own log-probs of ``response_ids`` (temperature-scaled), for the consistency check."""


def pack_samples(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded token tensors (see the module doc) from samples; ``rollout_logprobs`` when samples carry them."""
    n = len(samples)
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    resp_width = max(max(len(s.response_ids) for s in samples), 1)
    batch = {
        "input_ids": torch.full((n, width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(n, width, dtype=torch.long),
        "prompt_lens": torch.tensor([len(s.prompt_ids) for s in samples], dtype=torch.long),
        "response_ids": torch.full((n, resp_width), pad_id, dtype=torch.long),
        "response_mask": torch.zeros(n, resp_width, dtype=torch.float32),
        "rollout_logprobs": torch.zeros(n, resp_width, dtype=torch.float32),
    }
    for i, s in enumerate(samples):
        seq = s.prompt_ids + s.response_ids
        batch["input_ids"][i, :len(seq)] = torch.tensor(seq)
        batch["attention_mask"][i, :len(seq)] = 1
        r = len(s.response_ids)
        batch["response_ids"][i, :r] = torch.tensor(s.response_ids)
        batch["response_mask"][i, :r] = 1
        if s.logprobs:
            batch["rollout_logprobs"][i, :r] = torch.tensor(s.logprobs)
    return batch


def take(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of a batch with the padding columns they do not need trimmed off."""
    lens = batch["attention_mask"][rows].sum(1)
    width = int(lens.max()) if len(rows) else 0
    resp_width = max(int(batch["response_mask"][rows].sum(1).max()) if len(rows) else 0, 1)
    out = {}
    for key, value in batch.items():
        value = value[rows]
        if key in SEQUENCE_KEYS:
            value = value[:, :width]
        elif value.dim() == 2:
            value = value[:, :resp_width]
        out[key] = value
    return out


def shard_rows(n_rows: int, n_shards: int) -> list[torch.Tensor]:
    """Contiguous, equal row blocks for the learner ranks (``n_rows`` must be divisible by ``n_shards``)."""
    return list(torch.arange(n_rows).chunk(n_shards))


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


@torch.no_grad()
def score_batch(model, batch: dict[str, torch.Tensor], micro_batch_size: int, temperature: float,
                with_values: bool, with_entropy: bool = False, device: torch.device | str = "cpu"
                ) -> dict[str, torch.Tensor]:
    """Run ``model`` (a ``PolicyWithValue``, possibly wrapped by DDP/DeepSpeed) over ``batch`` in micro-batches;
    returns CPU tensors ``[B, R]`` (``logprobs``, and ``values`` / ``entropy`` when asked), 0 on padding."""
    n, width = batch["response_ids"].shape
    parts: dict[str, list[torch.Tensor]] = {}
    for rows in torch.arange(n).split(micro_batch_size):
        mb = {k: v.to(device) for k, v in take(batch, rows).items()}
        out = model(mb["input_ids"], mb["attention_mask"], mb["prompt_lens"], mb["response_ids"],
                    temperature=temperature, with_values=with_values, with_entropy=with_entropy)
        for key, value in out.items():
            parts.setdefault(key, []).append(_pad_to((value * mb["response_mask"]).float().cpu(), width))
    return {k: torch.cat(v) for k, v in parts.items()}


def make_experience(model, policy, batch: dict[str, torch.Tensor], micro_batch_size: int, temperature: float,
                    with_values: bool, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Old log-probs and values from the current policy; reference log-probs from the same weights with the LoRA
    adapter disabled (``policy`` is the unwrapped ``PeftModel``: no second copy of the base model)."""
    current = score_batch(model, batch, micro_batch_size, temperature, with_values, device=device)
    with policy.disable_adapter():
        ref = score_batch(model, batch, micro_batch_size, temperature, with_values=False, device=device)
    out = {"old_logprobs": current["logprobs"], "ref_logprobs": ref["logprobs"]}
    if "values" in current:
        out["values"] = current["values"]
    return out


def finalize_experience(batch: dict[str, torch.Tensor], scores: torch.Tensor, group: torch.Tensor, kl_coef: float,
                        ppo_cfg) -> dict[str, float]:
    """Add ``kl``, ``advantages`` and ``returns`` to ``batch`` (in place) with the configured estimator: per-token
    rewards ``-kl_coef * KL_t``, the scalar score on the last token. Returns batch statistics."""
    mask = batch["response_mask"]
    kl = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], ppo_cfg.kl.estimator) * mask
    advantages, returns = compute_advantages(
        ppo_cfg.estimator, scores=scores.float(), kl_penalty=kl_coef * kl, mask=mask, group=group,
        values=batch.get("values"), gamma=ppo_cfg.gamma, lam=ppo_cfg.lam, whiten=ppo_cfg.whiten_advantages)
    batch.update(kl=kl, advantages=advantages * mask, returns=returns * mask)
    weights = behaviour_weights(batch["old_logprobs"], batch["behaviour_logprobs"], ppo_cfg.behaviour_weight_cap)
    batch["behaviour_weights"] = weights * mask
    stats = {
        "behaviour_weight_mean": float(masked_mean(weights, mask)),
        "kl": float(masked_mean(kl, mask, dim=1).mean()),
        "kl_seq_sum": float((kl * mask).sum(1).mean()),
        "advantage_mean": float(masked_mean(advantages, mask)),
        "return_mean": float(masked_mean(returns, mask)),
    }
    if "values" in batch:
        stats["value_mean"] = float(masked_mean(batch["values"], mask))
    return stats
