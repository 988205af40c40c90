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
    """The engine's log-probs of ``response_ids`` (vLLM only; the HF path scores its samples separately)."""


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


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, num_return_sequences: int = 1, batch_size: int = 8, seed: int | None = None,
             progress: bool = False) -> list[Generation]:
    """Sample ``num_return_sequences`` responses per prompt; results are grouped by prompt, in prompt order."""
    import torch

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
            with torch.no_grad():
                seqs = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature if do_sample else None, top_p=top_p if do_sample else None, top_k=None,
                    num_return_sequences=num_return_sequences, pad_token_id=pad_id, eos_token_id=sorted(eos),
                )
            width = enc["input_ids"].shape[1]
            for row, seq in enumerate(seqs.tolist()):
                i = row // num_return_sequences
                mask = enc["attention_mask"][i].tolist()
                prompt_ids = [t for t, m in zip(enc["input_ids"][i].tolist(), mask) if m]
                response = seq[width:]
                cut = next((k for k, t in enumerate(response) if t in eos), None)
                finished = cut is not None
                response = response[: cut + 1] if finished else response
                text = tokenizer.decode(response, skip_special_tokens=True)
                out.append(Generation(chunk[i], prompt_ids, response, text, finished))
    finally:
        tokenizer.padding_side = old_side
    return out
