"""Config of the ``prepare`` stage (owned by medrl.data)."""
from __future__ import annotations

from medrl.config_base import StrictModel


class DataConfig(StrictModel):
    sources: list[str] = ["medical-o1"]
    """Source names to load (see README, "Data sources")."""
