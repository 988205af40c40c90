"""Config of the ``sft`` stage (owned by medrl.sft)."""
from __future__ import annotations

from medrl.config_base import StrictModel


class SFTConfig(StrictModel):
    max_steps: int = 100
