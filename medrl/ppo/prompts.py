"""RL prompts: loading ``rl_prompts.jsonl`` with one-line errors, and the deterministic order they are used in."""
from __future__ import annotations

import random
from pathlib import Path

from medrl.errors import UsageError
from medrl.jsonl import read_jsonl


def load_prompts(path: Path) -> list[dict]:
    """Rows of ``rl_prompts.jsonl`` (id, prompt, reference, risk, source, language, category, expected_behavior)."""
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
