"""Config of the ``ppo`` stage (owned by medrl.ppo)."""
from __future__ import annotations

from medrl.config_base import StrictModel


class PPOConfig(StrictModel):
    steps: int = 10
