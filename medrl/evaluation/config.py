"""Config of the ``eval`` and ``report`` stages (owned by medrl.evaluation)."""
from __future__ import annotations

from medrl.config_base import StrictModel


class EvalConfig(StrictModel):
    sets: list[str] = ["test", "gold", "redteam", "pubmedqa"]
