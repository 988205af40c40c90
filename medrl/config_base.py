"""The base class every config section derives from (kept apart from ``medrl.config`` to avoid import cycles)."""
from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors; assignments are validated; ``.inf`` and ``.nan`` are never a valid number."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False,
                              use_attribute_docstrings=True)
