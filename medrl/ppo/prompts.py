"""RL prompts: loading ``rl_prompts.jsonl`` with one-line errors, and the deterministic order they are used in."""
from __future__ import annotations

import json
import random
from pathlib import Path

from medrl.errors import UsageError


def load_prompts(path: Path) -> list[dict]:
    """Rows of ``rl_prompts.jsonl`` (id, prompt, reference, risk, source, language, category, expected_behavior)."""
    if not path.is_file():
        raise UsageError(f"RL prompts not found: {path} (run `medrl prepare` first)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        for key in ("id", "prompt"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise UsageError(f"{path}:{lineno}: key '{key}' must be a non-empty string")
        rows.append(row)
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
