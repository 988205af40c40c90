"""Config of the reward plane (owned by medrl.reward)."""
from __future__ import annotations

from medrl.config_base import StrictModel


class RewardConfig(StrictModel):
    w_rule: float = 0.6
    w_teacher: float = 0.4
