"""SFT examples: prepared records -> chat-template token ids with a completion mask (pure; no training code).

Each record becomes the conversational prompt-completion pair TRL expects: prompt = [system, user] (a conversation
record: [system, its turns...], ending with its last user turn), completion = [assistant: record["output"]]
(``<think>\\n…\\n</think>\\n\\n answer``). Only the completion is trained on: earlier assistant turns of a
conversation are context, masked out of the loss like the system and user turns. Tokens come from the tokenizer's
own chat template, so the same code serves the tiny model and the real Qwen3 (whose template has no
``{% generation %}`` markers, hence the mask is derived from the prompt rendered with ``add_generation_prompt=True``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medrl.errors import UsageError
from medrl.jsonl import read_jsonl
from medrl.models.chat import conversation, messages_for


def read_records(path: Path) -> list[dict]:
    """Rows of a prepared JSONL split; each needs non-empty string ``question`` and ``output``."""
    return read_jsonl(path, ("question", "output"), "run `medrl prepare` first (same config) to write the data splits")


def encode_example(tokenizer, system_prompt: str | None, record: dict) -> dict[str, list[int]]:
    """``input_ids`` of the whole conversation and ``completion_mask`` (1 on the last assistant turn's tokens: the
    record's output and the closing ``<|im_end|>\\n``; 0 on system, user, earlier assistant turns and the header)."""
    turns = conversation(record, record["question"])
    prompt = tokenizer.apply_chat_template(messages_for(system_prompt, turns), tokenize=True,
                                           add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages_for(system_prompt, turns, record["output"]), tokenize=True,
                                         return_dict=True)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise UsageError("the tokenizer's chat template renders the prompt differently with and without the answer; "
                         "SFT needs the generation prompt to be a prefix of the full conversation")
    return {"input_ids": list(full), "completion_mask": [0] * len(prompt) + [1] * (len(full) - len(prompt))}


@dataclass(frozen=True)
class LengthStats:
    examples: int
    truncated: int
    """Examples longer than ``max_seq_len``: their end is cut off."""
    dropped: int
    """Examples whose prompt alone fills ``max_seq_len``: no completion token left, the trainer drops them."""
    max_tokens: int

    def as_metrics(self, split: str) -> dict[str, int]:
        return {f"{split}_{k}": v for k, v in vars(self).items()}


def length_stats(examples: list[dict[str, list[int]]], max_seq_len: int) -> LengthStats:
    lengths = [len(e["input_ids"]) for e in examples]
    prompt_lengths = [e["completion_mask"].index(1) if 1 in e["completion_mask"] else len(e["completion_mask"])
                      for e in examples]
    return LengthStats(examples=len(examples), truncated=sum(n > max_seq_len for n in lengths),
                       dropped=sum(p >= max_seq_len for p in prompt_lengths), max_tokens=max(lengths, default=0))
