"""PPO on the tiny model: the reward of the last steps must clearly beat the first steps, with a dense rule reward
and with HuatuoGPT-o1's verifier reward on a synthetic multiple-choice set."""
import json

import numpy as np
import pytest
import torch

from medrl.ppo.driver import PPOTrainer
from ppo_setup import fit_and_save, ppo_config

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


MCQ_OPTIONS = {"A": "rest and fluids", "B": "see a doctor today"}


def _mcq_prompts(run) -> None:
    """Eight synthetic two-option questions whose right letter is always B: learnable by a tiny model (one bias)."""
    with open(run.data / "rl_prompts.jsonl", "w", encoding="utf-8") as f:
        for i in range(8):
            question = f"Case {i}: a patient has had chest pain for {i + 1} hours. What should they do?"
            f.write(json.dumps({"id": f"mcq{i}", "prompt": question + "\nA. rest and fluids\nB. see a doctor today",
                                "reference": None, "risk": "high", "source": "test", "language": "en",
                                "label": "B", "options": MCQ_OPTIONS}) + "\n")


def _format_warm_start(cfg, run, path):
    """A LoRA adapter that writes HuatuoGPT-o1's format, ``<think>...</think>`` then "The answer is X.", with A and
    B equally often (a few supervised steps, the SFT stage in miniature): PPO must learn the letter, not the
    format."""
    from medrl.models.chat import render_prompt
    from medrl.models.loading import load_policy, load_tokenizer
    from medrl.ppo.batch import load_prompts

    torch.manual_seed(0)
    tok = load_tokenizer(cfg.model.path, cfg.model.cache_dir)
    policy = load_policy(cfg.model, None, trainable=True, device="cpu")
    pairs = []
    for k, row in enumerate(load_prompts(run.data / "rl_prompts.jsonl")):
        prompt = tok(render_prompt(tok, cfg.model.system_prompt, row["prompt"]), add_special_tokens=False)["input_ids"]
        for letter in "AB":
            answer = tok(f"<think>\nCheck the options.\n</think>\n\nThe answer is {letter}.<|im_end|>",
                         add_special_tokens=False)["input_ids"]
            pairs.append((prompt, answer))
    rows = [(prompt + answer, [-100] * len(prompt) + answer) for prompt, answer in pairs]
    return fit_and_save(policy, tok.pad_token_id, rows, 150, path)


@pytest.mark.slow
def test_ppo_learns_the_verifier_reward_of_the_huatuo_recipe(tiny_model_dir, tmp_path, ray_local):
    """``reward.preset: huatuo-o1`` end to end: the verifier alone scores each sampled answer through the Ray reward
    pool (1.0 the right letter, 0.1 a wrong one, 0 a broken format), and GRPO raises the mean reward."""
    steps = 14
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "huatuo", "reward.preset=huatuo-o1", f"ppo.steps={steps}",
                          "ppo.generation.max_new_tokens=24", "ppo.lr=0.001", "ppo.log_samples=false")
    _mcq_prompts(run)
    adapter = tmp_path / "format_adapter"
    sft_loss = _format_warm_start(cfg, run, adapter)
    cfg.ppo.init_adapter = str(adapter)
    with PPOTrainer(cfg, run) as trainer:
        history = [trainer.step() for _ in range(steps)]
    rewards = np.array([m["reward_mean"] for m in history])
    verifier = np.array([m["reward/verifier"] for m in history])
    first, last = rewards[:3].mean(), rewards[-3:].mean()
    trace = " ".join(f"{r:.2f}" for r in rewards)
    print(f"huatuo-o1 (warm-start loss {sft_loss:.3f}): reward {first:.2f} -> {last:.2f} ({trace})")
    assert np.array_equal(rewards, verifier)  # w_rule = w_teacher = 0: R is the verifier's score
    assert all(m["judge_failed"] == 0 and m["dropped"] == 0 for m in history)
    assert 0.2 < first < 0.8, f"the warm start should pick each letter about half the time: {trace}"
    assert last > first + 0.2 and last > 0.8, f"huatuo-o1: reward did not rise: {trace}"
