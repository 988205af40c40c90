"""Bit-for-bit reference of three PPO steps, to show that a restructuring of the step changed no number.

Three runs of the real ``PPOTrainer`` (real Ray, HF rollout engine, tiny Qwen3 built here with seed 0, the reward
plane's rules: the length rule of ``tests/ppo_setup.py``), 3 steps each:

  gae          on-policy PPO with the value head
  grpo-async   GRPO with ``async_rollout`` and 2 consultation cases per step (scripted patient: policy masks,
               multi-turn samples in the batch, the verifier's adjustment)
  grpo-filter  GRPO with ``filter_zero_spread_groups`` over 2 learner ranks (DDP over gloo: the cut to a multiple of
               the ranks and the token-balanced shards), groups of 3; the consultation groups (2 cases, verifier
               score 0 for every answer of the tiny model) have zero spread

For each: every metric of every step except the ``time_*`` ones (and ``judge_rate_wait_s``), a SHA-256 of the adapter
and value head the learner saves after step 3, and a SHA-256 of ``samples.jsonl``. ``--save`` writes them as JSON,
``--compare`` reruns and lists every difference (exit 1 if any). Same machine, same torch: float results of CPU
kernels may differ between CPU models.

    .venv/bin/python bench/ppo_bitwise.py --save /tmp/ppo_ref.json      # before a change (~2-3 min on 2 cores)
    .venv/bin/python bench/ppo_bitwise.py --compare /tmp/ppo_ref.json   # after it
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

STEPS = 3
CASES = "data/samples/consultation/cases.jsonl"
RUNS = {
    "gae": ("ppo.estimator=gae", "ppo.async_rollout=false"),
    "grpo-async": ("ppo.estimator=grpo", "ppo.async_rollout=true", f"consult.cases=[{REPO / CASES}]",
                   "consult.cases_per_step=2", "consult.max_turns=3", "consult.turn_tokens=12",
                   "reward.w_verifier=1"),
    "grpo-filter": ("ppo.estimator=grpo", "ppo.async_rollout=false", "ppo.filter_zero_spread_groups=true",
                    "ppo.learner.ranks=2", "ppo.learner.num_cpus=0.25", "ppo.prompts_per_step=4",
                    "ppo.samples_per_prompt=3", "ppo.minibatch_size=6", "ppo.micro_batch_size=4",
                    f"consult.cases=[{REPO / CASES}]", "consult.cases_per_step=2", "consult.max_turns=2",
                    "consult.turn_tokens=8", "reward.w_verifier=1"),
}


def tensors_sha(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def one_run(name: str, overrides: tuple[str, ...], model_dir: Path, workdir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from medrl.ppo.driver import PPOTrainer
    from ppo_setup import ppo_config

    cfg, run = ppo_config(workdir, model_dir, name, f"ppo.steps={STEPS}", *overrides)
    with PPOTrainer(cfg, run) as trainer:
        rows = [trainer.step() for _ in range(STEPS)]
        out = workdir / f"{name}-saved"
        trainer.groups.learner.save(str(out), False)
    weights = {f"adapter.{k}": v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items()}
    if (out / "value_head.pt").is_file():
        weights.update({f"value_head.{k}": v for k, v in torch.load(out / "value_head.pt").items()})
    steps = [{k: v for k, v in sorted(r.items()) if not k.startswith("time_") and k != "judge_rate_wait_s"}
             for r in rows]
    samples = run.ppo_samples.read_bytes() if run.ppo_samples.is_file() else b""
    return {"steps": steps, "weights_sha256": tensors_sha(weights),
            "samples_sha256": hashlib.sha256(samples).hexdigest()}


def differences(ref: dict, now: dict) -> list[str]:
    out = []
    for name in ref:
        a, b = ref[name], now.get(name)
        if b is None:
            out.append(f"{name}: not run")
            continue
        for key in ("weights_sha256", "samples_sha256"):
            if a[key] != b[key]:
                out.append(f"{name}: {key} {a[key][:12]} -> {b[key][:12]}")
        for step, (ra, rb) in enumerate(zip(a["steps"], b["steps"]), 1):
            for key in sorted(set(ra) | set(rb)):
                if ra.get(key, "absent") != rb.get(key, "absent"):
                    out.append(f"{name} step {step}: {key} {ra.get(key, 'absent')!r} -> {rb.get(key, 'absent')!r}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--save", type=Path, help="write the reference here")
    what.add_argument("--compare", type=Path, help="compare with the reference written here")
    parser.add_argument("--only", choices=sorted(RUNS), action="append", help="these runs only (repeatable)")
    opts = parser.parse_args()

    from medrl.config import RayConfig
    from medrl.models.tiny import build_tiny_model
    from medrl.ray_utils import init_ray

    import ray

    names = opts.only or list(RUNS)
    result = {}
    with tempfile.TemporaryDirectory(prefix="ppo-bitwise-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny-qwen3")
        for attempt in range(3):  # a loaded machine: Ray gives its raylet 30 s to register, then gives up
            try:
                started = init_ray(RayConfig(num_cpus=2))
                break
            except Exception as exc:
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                print(f"Ray did not start ({exc}); again")
                ray.shutdown()
        try:
            for name in names:
                result[name] = one_run(name, RUNS[name], model_dir, Path(tmp))
                last = result[name]["steps"][-1]
                print(f"{name}: reward_mean {[s['reward_mean'] for s in result[name]['steps']]}, last "
                      f"policy_loss {last.get('policy_loss')}, samples {last['samples']}, weights "
                      f"{result[name]['weights_sha256'][:16]}, samples.jsonl {result[name]['samples_sha256'][:16]}")
        finally:
            if started:
                ray.shutdown()
    if opts.save:
        opts.save.write_text(json.dumps(result, indent=1, sort_keys=True))
        print(f"reference written to {opts.save}")
        return 0
    ref = json.loads(opts.compare.read_text())
    diff = differences({k: v for k, v in ref.items() if k in names}, result)
    print("\n".join(diff) if diff else f"identical to {opts.compare}: {', '.join(names)} "
          f"({STEPS} steps: every metric but the times, weights, samples.jsonl)")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
