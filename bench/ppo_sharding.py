"""What sharding a PPO step's batch twice costs the driver, against the lower bound of sharding it once.

Today (``medrl.ppo.groups.LearnerGroup``) the batch is sharded for the experience pass (``Batch.shard_rows``, each rank
gets its rows' tensors, the four token fields it computes come back and ``Batch.put_rows`` puts them at their rows),
then the rows left to learn (``algos.rows_to_learn``) are sharded again and every rank gets all their tensors anew
(``LearnerGroup.train``). The lower bound of sharding once: every rank keeps the tensors of its experience shard and
the train call ships only what the driver computed (advantages, returns, KL, loss mask) and which rows to keep.

Real Ray (local), ``--ranks`` actors standing in for learner ranks (they return the experience fields without a model:
what is measured is the data path), a batch of the shape of ``configs/qwen3_1p7b_24gb.yaml`` (16 prompts x 8
samples, prompts of 150-400 tokens, responses of 100-1024), real ``rows_to_learn`` and ``advantages_and_weights``
(GRPO, zero-spread groups filtered: a quarter of the groups). Prints the median of ``--repeat`` steps:

    .venv/bin/python bench/ppo_sharding.py [--ranks 2] [--prompts 16] [--samples 8] [--repeat 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from medrl.config import load_config  # noqa: E402
from medrl.models.generation import Sample  # noqa: E402
from medrl.ppo.algos import advantages_and_weights, rows_to_learn  # noqa: E402
from medrl.ppo.batch import Batch  # noqa: E402
from medrl.reward.types import RewardResult  # noqa: E402

EXPERIENCE = ("behaviour_logprobs", "old_logprobs", "ref_logprobs", "values")
DRIVER_FIELDS = ("kl", "advantages", "returns", "loss_mask")


@ray.remote(num_cpus=0)
class Rank:
    """A learner rank's data path: it returns the experience fields of its shard (no model) and keeps the shard."""

    def __init__(self):
        self.kept: Batch | None = None

    def make_experience(self, shard: Batch) -> dict[str, torch.Tensor]:
        self.kept = shard
        return {name: shard.rollout_logprobs - 0.01 * k for k, name in enumerate(EXPERIENCE)}

    def train(self, shard: Batch) -> dict[str, float]:  # today: the whole shard arrives again
        return {"tokens": float(shard.response_mask.sum())}

    def train_kept(self, rows: torch.Tensor, fields: dict[str, torch.Tensor]) -> dict[str, float]:
        shard = self.kept.take(rows).replace(**fields)  # sharding once: only the driver's fields arrive
        return {"tokens": float(shard.response_mask.sum())}


def synthetic_batch(prompts: int, samples: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in range(prompts):
        prompt = torch.randint(10, 150_000, (int(torch.randint(150, 400, (1,), generator=gen)),), generator=gen)
        for s in range(samples):
            r = int(torch.randint(100, 1025, (1,), generator=gen))
            out.append(Sample(prompt_index=p, sample_index=s, prompt_ids=prompt.tolist(),
                              response_ids=torch.randint(10, 150_000, (r,), generator=gen).tolist(), text="",
                              finished=r < 1024, logprobs=(-torch.rand(r, generator=gen)).tolist()))
    return Batch.pack(out, pad_id=0)


def rewards(batch: Batch, samples: int) -> list[RewardResult]:
    """Scores that differ within each group, except in every fourth group (all 0.5: zero spread, filtered)."""
    return [RewardResult(id=str(i), reward=0.5 if int(g) % 4 == 3 else float(i % samples) / samples, rule=0.0,
                         teacher=None)
            for i, g in enumerate(batch.group.tolist())]


def megabytes(batch_or_fields) -> float:
    tensors = batch_or_fields.tensors().values() if isinstance(batch_or_fields, Batch) else batch_or_fields.values()
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def one_step(actors: list, batch: Batch, ppo, samples: int) -> dict[str, float]:
    t0 = time.perf_counter()
    rows = batch.shard_rows(len(actors))
    shards = [batch.take(r).for_learner() for r in rows]
    parts = ray.get([a.make_experience.remote(s) for a, s in zip(actors, shards)])
    scored = batch.put_rows(rows, parts).with_rewards(rewards(batch, samples))
    t1 = time.perf_counter()
    learned, _ = rows_to_learn(scored, ppo, len(actors))
    learned, _ = advantages_and_weights(ppo, learned, 0.01)
    t2 = time.perf_counter()
    train_rows = learned.shard_rows(len(actors))  # today: shard again, ship everything
    train_shards = [learned.take(r).for_learner() for r in train_rows]
    ray.get([a.train.remote(s) for a, s in zip(actors, train_shards)])
    t3 = time.perf_counter()
    # the lower bound of sharding once: each rank keeps the rows of its experience shard that are learned from (equal
    # counts on every rank are not guaranteed: this measures the data path only) and gets only the driver's fields
    position = {(s.prompt_index, s.sample_index): j for j, s in enumerate(learned.samples)}
    calls, shipped = [], 0.0
    for actor, shard in zip(actors, rows):
        keys = [(scored.samples[i].prompt_index, scored.samples[i].sample_index) for i in shard.tolist()]
        local = [k for k, key in enumerate(keys) if key in position]
        at = torch.tensor([position[keys[k]] for k in local], dtype=torch.long)
        mine = learned.take(at)  # trimmed to these rows' longest response, as a shipped shard is
        fields = {name: getattr(mine, name) for name in DRIVER_FIELDS}
        shipped += megabytes(fields)
        calls.append(actor.train_kept.remote(torch.tensor(local, dtype=torch.long), fields))
    ray.get(calls)
    t4 = time.perf_counter()
    return {"experience_round_trip_s": t1 - t0, "driver_math_s": t2 - t1, "train_ship_all_s": t3 - t2,
            "train_ship_driver_fields_s": t4 - t3, "batch_mb": megabytes(batch),
            "experience_mb_back": sum(megabytes(p) for p in parts),
            "train_mb_all": sum(megabytes(s) for s in train_shards), "train_mb_driver_fields": shipped,
            "rows": len(batch), "rows_learned": len(learned)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    ppo = load_config(None, ["ppo.estimator=grpo", "ppo.filter_zero_spread_groups=true"]).ppo
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actors = [Rank.remote() for _ in range(args.ranks)]
        batch = synthetic_batch(args.prompts, args.samples, 0)
        one_step(actors, batch, ppo, args.samples)  # warm-up
        runs = [one_step(actors, batch, ppo, args.samples) for _ in range(args.repeat)]
    finally:
        ray.shutdown()
    print(f"{args.ranks} rank(s), {runs[0]['rows']} rows ({runs[0]['rows_learned']} learned), "
          f"median of {args.repeat} steps, torch {torch.__version__}, ray {ray.__version__}")
    for key in runs[0]:
        if key not in ("rows", "rows_learned"):
            value = statistics.median(r[key] for r in runs)
            print(f"  {key:28s} {value * 1000:9.1f} ms" if key.endswith("_s") else f"  {key:28s} {value:9.2f} MB")
    extra = statistics.median(r["train_ship_all_s"] - r["train_ship_driver_fields_s"] for r in runs)
    print(f"  second sharding costs {extra * 1000:.1f} ms per step over the lower bound of sharding once")


if __name__ == "__main__":
    main()
