"""KL coefficient controllers (pure; checkpointed through ``state_dict``)."""
from __future__ import annotations


class FixedKLController:
    """A constant coefficient."""

    def __init__(self, init_coef: float):
        self.value = float(init_coef)

    def update(self, current_kl: float, n_samples: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n / horizon)``
    after a batch of ``n`` samples, so beta grows while the KL is above target and shrinks below it."""

    def __init__(self, init_coef: float, target: float, horizon: int):
        super().__init__(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_samples: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


def make_kl_controller(kl_cfg) -> FixedKLController:
    """From ``cfg.ppo.kl`` (mode, init_coef, target, horizon)."""
    if kl_cfg.mode == "adaptive":
        return AdaptiveKLController(kl_cfg.init_coef, kl_cfg.target, kl_cfg.horizon)
    return FixedKLController(kl_cfg.init_coef)
