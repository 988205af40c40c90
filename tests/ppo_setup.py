"""Shared set-up of the PPO tests: a run directory with RL prompts and a tiny, fast PPO config.

The reward is the real reward plane with rules only (no judge): the length rule alone, with ``min_tokens`` far above
the generation budget, so the reward is the estimated token count of the answer / 100 -- a dense objective a random
tiny model can improve on within a few steps (CJK characters and punctuation count more than Latin word pieces)."""
from __future__ import annotations

import json
from pathlib import Path

from medrl.config import load_config
from medrl.runs import RunDir

PROMPTS = [
    ("p1", "I have chest pain radiating to my left arm, what should I do?", "high", "en"),
    ("p2", "What is a normal resting heart rate for adults?", "low", "en"),
    ("p3", "发烧三天了，咳嗽，需要去医院吗？", "medium", "zh"),
    ("p4", "How much ibuprofen can I take for a headache?", "medium", "en"),
    ("p5", "糖尿病患者可以吃水果吗？", "low", "zh"),
    ("p6", "My child swallowed a button battery, what now?", "high", "en"),
    ("p7", "What are common side effects of metformin?", "low", "en"),
    ("p8", "高血压应该怎么控制饮食？", "low", "zh"),
]


def write_prompts(run: RunDir) -> Path:
    run.data.mkdir(parents=True, exist_ok=True)
    path = run.data / "rl_prompts.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for pid, prompt, risk, lang in PROMPTS:
            f.write(json.dumps({"id": pid, "prompt": prompt, "reference": None, "risk": risk, "source": "test",
                                "language": lang, "category": None, "expected_behavior": None},
                               ensure_ascii=False) + "\n")
    return path


def ppo_config(tmp_path: Path, model_dir: Path, name: str, *overrides: str):
    """Config + run dir (prompts written) for a short PPO run on the tiny model."""
    base = [
        f"run.root={tmp_path}", f"run.name={name}", "run.seed=1",
        f"model.path={model_dir}", "model.device=cpu", "model.dtype=float32",
        # lm_head joins the LoRA targets: the random tiny model's tied embeddings are too small to move its outputs
        "model.lora.target_modules=[q_proj,v_proj,lm_head]",
        "ray.num_cpus=2",
        "reward.judge.provider=none", f"reward.cache.path={tmp_path / 'judge_cache.sqlite'}",
        "reward.judge.num_actors=1",
        "reward.rules.format.weight=0", "reward.rules.keywords.weight=0", "reward.rules.safety.weight=0",
        "reward.rules.length.weight=1", "reward.rules.length.min_tokens=100", "reward.rules.length.max_tokens=1000",
        "ppo.prompts_per_step=4", "ppo.samples_per_prompt=4", "ppo.generation.max_new_tokens=16",
        "ppo.minibatch_size=8", "ppo.micro_batch_size=8", "ppo.lr=0.02", "ppo.value_lr=0.01",
        "ppo.kl.mode=fixed", "ppo.kl.init_coef=0.001", "ppo.lr_scheduler=constant",
        "ppo.rollout.batch_size=2", "ppo.rollout.num_cpus=0.5", "ppo.learner.num_cpus=0.5",
        "ppo.init_adapter=null",
    ]
    cfg = load_config(None, base + list(overrides))
    run = RunDir.from_config(cfg).ensure()
    write_prompts(run)
    return cfg, run


def weights_digests(*learners) -> list[dict[str, float]]:
    """Abs-sum of every trainable tensor of each learner rank (Ray actors, asked together: ZeRO-3 gathers
    collectively), to check that ranks hold identical weights and whether an update moved them."""
    import ray

    def digest(rank) -> dict[str, float]:
        with rank._gathered(p for p in rank.unwrapped.parameters() if p.requires_grad):
            return {n: float(p.detach().double().abs().sum()) for n, p in rank.unwrapped.named_parameters()
                    if p.requires_grad}

    return ray.get([learner.__ray_call__.remote(digest) for learner in learners])


def fit_and_save(policy, pad_id: int, rows: list[tuple[list[int], list[int]]], steps: int, path) -> float:
    """A warm start for a learning test: full-batch AdamW (lr 1e-2) for ``steps`` steps on ``rows`` of (input ids,
    labels; -100 where no loss), right-padded; saves the adapter to ``path``; returns the last loss."""
    import torch

    width = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for row, (i, lab) in enumerate(rows):
        ids[row, :len(i)] = torch.tensor(i)
        labels[row, :len(lab)] = torch.tensor(lab)
        attention[row, :len(i)] = 1
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = policy(input_ids=ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.save_pretrained(path)
    return float(loss.detach())
