"""PPO with ``reward.preset: rubric`` on the tiny model, graded through the Ray reward pool by the loopback judge over
real HTTP: the reward (rubric item score) rises on criteria the tiny model can learn ("mentions <a common word>"),
and a second identical run pays 0 judge calls (every criterion verdict comes from the judge store)."""
import json

import numpy as np
import pytest

from medrl.ppo.driver import PPOTrainer
from medrl.testing.loopback_server import LoopbackJudge
from ppo_setup import ppo_config

STEPS = 16
WORDS = ("pain", "fever", "emergency", "call", "blood", "dose", "chest", "check", "take", "care", "arm", "patient")
"""Common words of the tiny model's corpus: each is one criterion worth one point."""
RUBRIC = [{"criterion": f"Mentions {w}.", "points": 1, "tags": ["axis:completeness"]} for w in WORDS] + [
    {"criterion": "Mentions prescription.", "points": -1, "tags": ["axis:accuracy"]}]


def _write_rubric_prompts(run) -> None:
    questions = ["I have chest pain, what should I do?", "What helps a fever?", "How do I take my blood pressure?",
                 "When should I call a doctor?"]
    with open(run.data / "rl_prompts.jsonl", "w", encoding="utf-8") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"id": f"r{i}", "prompt": q, "messages": [{"role": "user", "content": q}],
                                "rubrics": RUBRIC, "reference": None, "risk": "low", "source": "test",
                                "language": "en", "category": None, "expected_behavior": None}) + "\n")


def _run(tmp_path, tiny_model_dir, server, name):
    cfg, run = ppo_config(tmp_path, tiny_model_dir, name, "ppo.estimator=grpo", f"ppo.steps={STEPS}",
                          "ppo.log_samples=false", "reward.preset=rubric", "reward.w_rule=0",
                          "reward.judge.provider=openai", f"reward.judge.base_url={server.base_url}",
                          "reward.judge.rpm=0", "reward.judge.tpm=0", "reward.judge.budget_usd=null")
    _write_rubric_prompts(run)
    with PPOTrainer(cfg, run) as trainer:
        return [trainer.step() for _ in range(STEPS)]


@pytest.mark.slow
def test_ppo_learns_a_rubric_and_a_second_run_pays_nothing(tiny_model_dir, tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_API_KEY", "test-key")
    with LoopbackJudge() as server:
        history = _run(tmp_path, tiny_model_dir, server, "rubric-1")
        paid = server.stats()["total"]
        rewards = np.array([m["reward_mean"] for m in history])
        first, last = rewards[:4].mean(), rewards[-4:].mean()
        trace = " ".join(f"{r:.2f}" for r in rewards)
        print(f"rubric reward {first:.2f} -> {last:.2f} ({trace}); {paid} judge calls")
        assert last > first + 0.08, f"rubric reward did not rise: {trace}"
        assert paid > 0
        again = _run(tmp_path, tiny_model_dir, server, "rubric-2")  # same seed, same store: every verdict cached
        assert server.stats()["total"] == paid
        assert [m["reward_mean"] for m in again] == [m["reward_mean"] for m in history]
