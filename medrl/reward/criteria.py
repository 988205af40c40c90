"""HealthBench's item score (pure): the contract formula shared by the rubric reward and the eval."""
from __future__ import annotations

from typing import Sequence


def item_score(points: Sequence[float], met: Sequence[bool]) -> float:
    """Sum of the points of the met criteria over the sum of the positive points (unclipped: a met negative criterion
    subtracts, so the score can be < 0). Raises ValueError when no criterion has positive points."""
    possible = sum(p for p in points if p > 0)
    if possible <= 0:
        raise ValueError("a rubric needs at least one criterion with positive points")
    return sum(p for p, m in zip(points, met, strict=True) if m) / possible
