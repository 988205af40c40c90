"""What the judge rate limits (``reward.judge.rpm`` / ``tpm``) cost: reported by ``medrl judge`` and per PPO step,
with a warning when they bind (pure; the numbers come from the ledger's ``rate_wait_call_s``)."""
from __future__ import annotations

import logging

from medrl.reward.config import JudgeConfig

log = logging.getLogger("medrl.reward")

BINDS_SHARE = 0.1
"""The limit binds when calls waited on it, summed, for more than this share of the elapsed time."""


def warn_if_rate_limit_binds(jc: JudgeConfig, wait_call_s: float, limited_calls: int, seconds: float) -> bool:
    """Warn when the limits held judge calls back for more than a tenth of the elapsed time (summed over calls):
    throughput is then set by the limit, not by the provider."""
    if limited_calls == 0 or wait_call_s <= BINDS_SHARE * max(seconds, 1e-9):
        return False
    log.warning("the judge rate limit binds: %d calls waited %.0f s in all (%.2f s each) over %.1f s "
                "(reward.judge.rpm=%s, tpm=%s); raise them if your provider allows more", limited_calls, wait_call_s,
                wait_call_s / limited_calls, seconds, jc.rpm or "unlimited", jc.tpm or "unlimited")
    return True


class RateWaitMeter:
    """Per-step rate-limit waits from the pool's cumulative ledger stats; warns the first time the limit binds."""

    def __init__(self, jc: JudgeConfig):
        self.jc, self._total, self._calls, self._warned = jc, 0.0, 0, False

    def step(self, stats: dict, seconds: float) -> float:
        """Call-seconds waited since the previous call (``stats``: the pool's ``stats()``)."""
        total, calls = stats.get("rate_wait_call_s", 0.0), stats.get("rate_limited_calls", 0)
        wait, limited = total - self._total, calls - self._calls
        self._total, self._calls = total, calls
        if not self._warned:
            self._warned = warn_if_rate_limit_binds(self.jc, wait, limited, seconds)
        return wait
