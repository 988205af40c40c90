"""The rollout correction's effect on the async learning test (``tests/test_ppo_learning_on_cpu.py``, grpo-async):
reward curves with ``ppo.rollout_correction.mode`` none / tis / mis, with the engine and the learner matched (the HF
engine keeps the log-probs it samples with, the learner's model code in fp32: rho 1 to ~1e-6) and with an emulated
mismatch.

The mismatch: the rollout engines sample and score at ``--engine-temperature`` (default 1.3) while the learner scores
the same tokens at 1.0, so pi_engine != pi_learner on every token, as a bf16 vLLM engine differs from the learner
(here more: ``rollout_kl`` ~1e-2 to 4e-2, rho up to ~2.7). The engine is swapped in here, never in production code;
``ppo.logprob_gap_abort`` is raised so the weight-sync check lets the run go on. Prints one line per run: the mean
reward of the first and last 4 steps, the curve, and the rollout metrics (``rollout_kl``, ``rollout_is_mean`` /
``_max``, clipped / masked fraction).

    .venv/bin/python bench/rollout_correction.py                    # 5 runs x 20 steps
    .venv/bin/python bench/rollout_correction.py --steps 12         # the figures in docs/ppo.md
    .venv/bin/python bench/rollout_correction.py --steps 10 --only mismatch
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tests/ppo_setup.py: the learning tests' run set-up

RUNS = {"matched": ("none", "tis"), "mismatch": ("none", "tis", "mis")}


def run(workdir: Path, model_dir: Path, mode: str, engine_temperature: float | None, steps: int) -> list[dict]:
    """One async GRPO run of the learning test's set-up; the per-step metrics rows."""
    from medrl.ppo import groups
    from medrl.ppo.driver import PPOTrainer
    from ppo_setup import ppo_config

    name = f"{mode}-{engine_temperature or 'matched'}"
    cfg, run_dir = ppo_config(workdir, model_dir, name, "ppo.estimator=grpo", f"ppo.steps={steps}",
                              "ppo.log_samples=false", "ppo.async_rollout=true",
                              f"ppo.rollout_correction.mode={mode}", "ppo.logprob_gap_abort=100")
    original = groups.rollout_engine
    if engine_temperature is not None:
        def hot_engine(c, init_adapter):
            engine_cls, args = original(c, init_adapter)
            model_cfg, adapter, gen = args
            return engine_cls, (model_cfg, adapter, gen.model_copy(update={"temperature": engine_temperature}))

        groups.rollout_engine = hot_engine
    try:
        with PPOTrainer(cfg, run_dir) as trainer:
            return [trainer.step() for _ in range(steps)]
    finally:
        groups.rollout_engine = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--engine-temperature", type=float, default=1.3)
    p.add_argument("--only", choices=tuple(RUNS), default=None)
    opts = p.parse_args()

    import numpy as np

    from medrl.config import RayConfig
    from medrl.models.tiny import build_tiny_model
    from medrl.ray_utils import init_ray

    init_ray(RayConfig(num_cpus=2))
    with tempfile.TemporaryDirectory(prefix="medrl-rc-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny-qwen3")
        for setting, modes in RUNS.items():
            if opts.only not in (None, setting):
                continue
            for mode in modes:
                rows = run(Path(tmp), model_dir, mode, opts.engine_temperature if setting == "mismatch" else None,
                           opts.steps)
                rewards = np.array([m["reward_mean"] for m in rows])
                key = {"tis": "rollout_is_clipped_frac", "mis": "rollout_is_masked_frac"}.get(mode)
                frac = float(np.mean([m[key] for m in rows])) if key else 0.0
                print(f"{setting:8s} {mode:4s}  reward {rewards[:4].mean():.2f} -> {rewards[-4:].mean():.2f}  "
                      f"rollout_kl {np.mean([m['rollout_kl'] for m in rows]):.2e}  "
                      f"is_mean {np.mean([m['rollout_is_mean'] for m in rows]):.3f}  "
                      f"is_max {max(m['rollout_is_max'] for m in rows):.2f}  clipped/masked {frac:.3f}  "
                      f"({' '.join(f'{r:.2f}' for r in rewards)})", flush=True)


if __name__ == "__main__":
    main()
