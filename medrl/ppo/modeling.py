"""The policy (base + LoRA) with an optional value head, turning response tokens into log-probs (and values) in one
forward pass; ``logprobs_and_values`` runs it over a ``Batch`` in micro-batches. No Ray in here.

Both the learner and the rollout actors compute log-probs through these two, so the log-prob consistency check
after a weight sync compares two runs of the very same code on the very same tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from medrl.ppo.batch import Batch
from medrl.ppo.objective import entropy_from_logits


class PolicyWithValue(nn.Module):
    """``policy``: a peft ``PeftModel`` over a causal LM. ``value_head``: ``Linear(hidden, 1)`` reading the last
    hidden state of the policy trunk (None for critic-free estimators). With ``detach_value`` the value loss does not
    reach the trunk."""

    def __init__(self, policy: nn.Module, value_head: nn.Module | None = None, detach_value: bool = False):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.detach_value = detach_value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor,
                response_ids: torch.Tensor, temperature: float = 1.0, with_values: bool = True,
                with_entropy: bool = False) -> dict[str, torch.Tensor]:
        """Log-probs ``[B, R]`` of ``response_ids`` (right padded) given the right-padded ``input_ids`` =
        prompt + response; plus values ``[B, R]`` (state before each response token) and entropy when asked.
        Only the hidden states of response positions go through the LM head."""
        lm = self.policy.get_base_model()
        hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        n_rows, width = response_ids.shape
        # the logits at position p predict token p + 1: response token j of row b is predicted at prompt_len_b-1+j
        pos = (prompt_lens[:, None] - 1 + torch.arange(width, device=input_ids.device)[None]).clamp(
            max=input_ids.shape[1] - 1)
        h = hidden[torch.arange(n_rows, device=input_ids.device)[:, None], pos]
        logits = lm.lm_head(h).float() / temperature
        logprobs = logits.gather(-1, response_ids[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        out = {"logprobs": logprobs}
        if with_values and self.value_head is not None:
            trunk = (h.detach() if self.detach_value else h).to(self.value_head.weight.dtype)
            out["values"] = self.value_head(trunk).squeeze(-1).float()
        if with_entropy:
            with torch.no_grad():
                out["entropy"] = torch.stack([entropy_from_logits(row) for row in logits.detach()])
        return out


def make_value_head(policy: nn.Module) -> nn.Linear:
    """``Linear(hidden_size, 1)`` initialised to 0 (values start at 0, so the first GAE advantages are the plain
    returns), in the dtype/device of the policy's LM head."""
    lm_head = policy.get_base_model().lm_head
    head = nn.Linear(lm_head.in_features, 1, dtype=torch.float32, device=lm_head.weight.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


@torch.no_grad()
def logprobs_and_values(model: nn.Module, batch: Batch, micro_batch_size: int, temperature: float,
                        with_values: bool, with_entropy: bool = False, device: torch.device | str = "cpu"
                        ) -> dict[str, torch.Tensor]:
    """Run ``model`` (a ``PolicyWithValue``, possibly wrapped by DDP/DeepSpeed) over ``batch`` in micro-batches;
    returns CPU tensors ``[B, R]`` (``logprobs``, and ``values`` / ``entropy`` when asked), 0 on padding."""
    n, width = batch.response_ids.shape
    parts: dict[str, list[torch.Tensor]] = {}
    for rows in torch.arange(n).split(micro_batch_size):
        mb = batch.take(rows).to(device)
        out = model(mb.input_ids, mb.attention_mask, mb.prompt_lens, mb.response_ids, temperature=temperature,
                    with_values=with_values, with_entropy=with_entropy)
        for key, value in out.items():
            value = (value * mb.response_mask).float().cpu()
            parts.setdefault(key, []).append(nn.functional.pad(value, (0, width - value.shape[1])))
    return {k: torch.cat(v) for k, v in parts.items()}


def old_and_ref_logprobs(model: nn.Module, policy: nn.Module, batch: Batch, micro_batch_size: int,
                         temperature: float, with_values: bool, device: torch.device | str = "cpu",
                         with_reference: bool = True) -> dict[str, torch.Tensor]:
    """``old_logprobs`` (+ ``values``) from the current weights; with ``with_reference`` (a non-zero KL
    coefficient) ``ref_logprobs`` from the same weights with the LoRA adapter disabled (``policy`` is the unwrapped
    ``PeftModel``: no second copy of the base model)."""
    current = logprobs_and_values(model, batch, micro_batch_size, temperature, with_values, device=device)
    out = {"old_logprobs": current["logprobs"]}
    if with_reference:
        with policy.disable_adapter():
            out["ref_logprobs"] = logprobs_and_values(model, batch, micro_batch_size, temperature, with_values=False,
                                                      device=device)["logprobs"]
    if "values" in current:
        out["values"] = current["values"]
    return out
