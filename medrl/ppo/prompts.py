"""RL prompts: loading ``rl_prompts.jsonl`` with one-line errors, the deterministic order they are used in, their
rollout micro-batches and seeds, and what the reward plane gets for a response to one."""
from __future__ import annotations

import random
from pathlib import Path

from medrl.errors import UsageError
from medrl.jsonl import read_jsonl
from medrl.models.chat import conversation
from medrl.reward.types import RewardInput


def load_prompts(path: Path) -> list[dict]:
    """Rows of ``rl_prompts.jsonl`` (id, prompt, reference, risk, source, language, category, expected_behavior,
    messages, rubrics, example_tags)."""
    rows = read_jsonl(path, ("id", "prompt"), "run `medrl prepare` first (same config) to write the RL prompts")
    if not rows:
        raise UsageError(f"{path}: no RL prompts")
    return rows


def prompts_at(rows: list[dict], position: int, count: int, seed: int) -> list[dict]:
    """``count`` prompts starting at global ``position`` of an endless stream: every epoch (pass over ``rows``) is a
    fresh shuffle seeded by (seed, epoch), so the order depends on the position alone (exact resume)."""
    n = len(rows)
    out = []
    for pos in range(position, position + count):
        order = list(range(n))
        random.Random(seed * 7919 + pos // n).shuffle(order)
        out.append(rows[order[pos % n]])
    return out


def micro_batches(texts: list[str], size: int, seed: int, step_no: int
                  ) -> tuple[list[list[tuple[int, str]]], list[int]]:
    """Rendered prompts in rollout micro-batches of ``size`` ``(index, text)`` pairs, and one sampling seed per
    micro-batch from (run seed, step, micro-batch): the same step draws the same samples after a resume."""
    indexed = list(enumerate(texts))
    chunks = [indexed[start:start + size] for start in range(0, len(indexed), size)]
    return chunks, [(seed * 1_000_003 + step_no * 1_009 + c) % 2**31 for c in range(len(chunks))]


def prompt_turns(record: dict) -> list[dict]:
    """The conversation a policy answers for an RL prompt row (its turns, the last one its ``prompt``)."""
    return conversation(record, record["prompt"])


def reward_input(record: dict, step_no: int, sample_index: int, response: str) -> RewardInput:
    """What the reward plane gets for one response to ``record`` (id ``prompt-id:step:sample``): a conversation
    row brings its turns as the policy saw them, and its rubric."""
    return RewardInput(id=f"{record['id']}:{step_no}:{sample_index}", prompt=record["prompt"], response=response,
                       reference=record.get("reference"), risk=record.get("risk") or "low",
                       expected_behavior=record.get("expected_behavior"), language=record.get("language"),
                       label=record.get("label"), options=record.get("options"),  # ground truth for the verifier
                       messages=tuple(prompt_turns(record)) if record.get("messages") else None,
                       rubrics=tuple(record["rubrics"]) if record.get("rubrics") else None)
