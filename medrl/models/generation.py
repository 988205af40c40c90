"""Batched sampling with HF ``generate`` (left padding), shared by rollouts and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field

from tqdm.auto import tqdm


@dataclass
class Generation:
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    """Generated ids up to and including the first EOS (no padding)."""
    text: str
    """Decoded response without special tokens (``<think>`` tags are kept)."""
    finished: bool
    """True when the response ended with an EOS token rather than hitting ``max_new_tokens``."""
    logprobs: list[float] = field(default_factory=list)
    """The engine's log-probs of ``response_ids`` as it sampled them (``with_logprobs``; vLLM: always)."""


@dataclass
class Sample:
    """One sampled response, as a rollout engine returns it (PPO rollouts, consultations)."""

    prompt_index: int
    """Position of the prompt in this step's prompt list (samples of one prompt form a GRPO/RLOO group)."""
    sample_index: int
    """Which of the ``samples_per_prompt`` responses of that prompt."""
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool
    logprobs: list[float] = field(default_factory=list)
    """The engine's own log-probs of ``response_ids`` (temperature-scaled), for the rollout-vs-learner check."""
    policy_mask: list[int] | None = None
    """Consultation dialogues: 1 on the tokens the policy sampled, 0 on the patient's turns (None: all 1)."""
    dialogue: dict | None = None
    """Consultation dialogues: ``medrl.consult.dialogue.Dialogue.summary()`` (turns, status, answer, calls)."""


def eos_ids(generation_config, tokenizer) -> set[int]:
    """Token ids that end a response: the model's generation config's EOS ids plus the tokenizer's."""
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class SampledLogprobs:
    """A ``generate`` logits processor that keeps the log-prob of every sampled token, as the engine drew it: the
    log-softmax of the step's scores over the temperature (transformers applies custom processors before its sampling
    warpers: temperature, top-p), which the next step's ``input_ids`` (or, for the last one, the output) index with
    the token drawn. The same quantity the learner computes from a full forward pass, at the cost of one
    log-softmax per step instead of a second pass over the batch; only the last step's distribution is held."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending = None
        self.picked: list = []

    def __call__(self, input_ids, scores):
        import torch

        if self.pending is not None:
            self.picked.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences) -> list[list[float]]:
        """Each row's log-probs of its generated tokens (``sequences``: what ``generate`` returned)."""
        import torch

        if self.pending is not None:
            self.picked.append(self.pending.gather(-1, sequences[:, -1:]).squeeze(-1))
        self.pending = None
        picked, self.picked = self.picked, []
        return torch.stack(picked, 1).tolist() if picked else [[] for _ in range(len(sequences))]


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, num_return_sequences: int = 1, batch_size: int = 8, seed: int | None = None,
             progress: bool = False, with_logprobs: bool = False) -> list[Generation]:
    """Sample ``num_return_sequences`` responses per prompt; results are grouped by prompt, in prompt order. With
    ``with_logprobs`` (sampling only) each carries its tokens' log-probs as sampled (``SampledLogprobs``)."""
    import torch
    from transformers import LogitsProcessorList

    if seed is not None:
        torch.manual_seed(seed)
    eos = eos_ids(model.generation_config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    do_sample = temperature > 0
    out: list[Generation] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            scorer = SampledLogprobs(temperature) if with_logprobs and do_sample else None
            with torch.no_grad():
                seqs = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature if do_sample else None, top_p=top_p if do_sample else None, top_k=None,
                    num_return_sequences=num_return_sequences, pad_token_id=pad_id, eos_token_id=sorted(eos),
                    logits_processor=LogitsProcessorList([scorer] if scorer else []),
                )
            width = enc["input_ids"].shape[1]
            logprobs = scorer.finish(seqs) if scorer else None
            for row, seq in enumerate(seqs.tolist()):
                i = row // num_return_sequences
                mask = enc["attention_mask"][i].tolist()
                prompt_ids = [t for t, m in zip(enc["input_ids"][i].tolist(), mask) if m]
                response = seq[width:]
                cut = next((k for k, t in enumerate(response) if t in eos), None)
                finished = cut is not None
                response = response[: cut + 1] if finished else response
                text = tokenizer.decode(response, skip_special_tokens=True)
                out.append(Generation(chunk[i], prompt_ids, response, text, finished,
                                      logprobs[row][:len(response)] if logprobs else []))
    finally:
        tokenizer.padding_side = old_side
    return out
