"""PPO on the tiny model with a dense rule reward: the reward of the last steps must clearly beat the first steps."""
import numpy as np
import pytest

from medrl.ppo.driver import PPOTrainer
from ppo_setup import ppo_config

STEPS = 20
DR_GRPO_CLIP_HIGHER = ("ppo.clip_low=0.2", "ppo.clip_high=0.28")


@pytest.mark.slow
@pytest.mark.parametrize("estimator,async_rollout,extra", [("gae", False, ()), ("grpo", False, ()),
                                                           ("grpo", True, ()), ("dr_grpo", False, DR_GRPO_CLIP_HIGHER)],
                         ids=["gae", "grpo", "grpo-async", "dr_grpo-clip-higher"])
def test_ppo_raises_reward(estimator, async_rollout, extra, tiny_model_dir, tmp_path, ray_local):
    """async_rollout: every step after the first learns from samples drawn one update earlier. dr_grpo-clip-higher:
    Dr. GRPO's advantages (no std division) with DAPO's asymmetric clip."""
    cfg, run = ppo_config(tmp_path, tiny_model_dir, estimator, f"ppo.estimator={estimator}", f"ppo.steps={STEPS}",
                          "ppo.log_samples=false", f"ppo.async_rollout={str(async_rollout).lower()}", *extra)
    with PPOTrainer(cfg, run) as trainer:
        history = [trainer.step() for _ in range(STEPS)]
    assert [m["rollout_staleness"] for m in history] == [0] + [int(async_rollout)] * (STEPS - 1)
    rewards = np.array([m["reward_mean"] for m in history])
    first, last = rewards[:4].mean(), rewards[-4:].mean()
    trace = " ".join(f"{r:.2f}" for r in rewards)
    print(f"{estimator}{'-async' if async_rollout else ''}: reward {first:.2f} -> {last:.2f} ({trace})")
    assert last > first + 0.2, f"{estimator}: reward did not rise: {trace}"
    # learning moved the policy away from the reference, and the rollout weights followed the learner's
    assert history[-1]["kl"] > 0.05
    assert max(m["logprob_gap"] for m in history) < 1e-4
    if estimator == "gae":  # the zero-initialised value head learned the (positive) returns
        assert history[0]["value_mean"] == 0.0 and history[-1]["value_mean"] > 0.1
