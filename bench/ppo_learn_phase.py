"""The learn phase of a PPO step in one process, on a fixed batch: the learner's experience (behaviour, old where
the update needs a pass for them, and reference log-probs), the driver's advantages and weights, the update and the adapter publish, timed phase by phase
(wall and process CPU seconds, medians over the timed repeats). No Ray, no rollout, no reward: the numbers move only
when the learn-phase code does, so two trees can be compared on a shared machine (interleave their runs).

The settings are ``bench/ppo_vs_trl.py``'s (``configs/local_tiny.yaml``; GRPO, 4 prompts x 4 samples, 64 new
tokens, one minibatch and micro-batch of 16, KL 0.04 against the adapter-disabled reference), the batch is random
token ids of a fixed seed on the tiny Qwen3 (``medrl.models.tiny``, built once into ``--model-dir``). The rollout
engine's log-probs are the learner's plus noise of ~1e-6 (as the HF engine's are). ``--profile FILE`` writes a
cProfile of the timed repeats. It reads ``medrl`` from ``PYTHONPATH``, so an older checkout can be measured with
this file (their Batch / advantages APIs are both handled):

    PYTHONPATH=$PWD .venv/bin/python bench/ppo_learn_phase.py --repeats 12
    PYTHONPATH=/path/to/old/tree .venv/bin/python bench/ppo_learn_phase.py --repeats 12
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import statistics
import time
from pathlib import Path

PHASES = ("experience", "advantages", "train", "publish")


def make_batch(Batch, Sample, n_prompts: int, group: int, max_new: int, vocab: int, pad_id: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    samples = []
    for p in range(n_prompts):
        prompt = torch.randint(10, vocab, (int(torch.randint(60, 120, (1,), generator=gen)),), generator=gen).tolist()
        for s in range(group):
            short = bool(torch.rand(1, generator=gen) < 0.25)
            n = int(torch.randint(8, max_new, (1,), generator=gen)) if short else max_new
            response = torch.randint(10, vocab, (n,), generator=gen).tolist()
            samples.append(Sample(prompt_index=p, sample_index=s, prompt_ids=prompt, response_ids=response,
                                  text="x" * n, finished=short))
    return Batch.pack(samples, pad_id)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/medrl-learn-phase-tiny"))
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--profile", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the per-repeat times here")
    opts = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import medrl
    from medrl.config import load_config
    from medrl.models.tiny import build_tiny_model
    from medrl.ppo import algos
    from medrl.ppo.batch import Batch
    from medrl.ppo.learner import Learner

    try:
        from medrl.models.generation import Sample
    except ImportError:  # older trees
        from medrl.ppo.batch import Sample

    if not (opts.model_dir / "config.json").is_file():
        build_tiny_model(opts.model_dir)
    cfg = load_config(Path(medrl.__file__).parents[1] / "configs" / "local_tiny.yaml", [
        f"model.path={opts.model_dir}", "model.build_tiny_if_missing=false", "ppo.estimator=grpo",
        "ppo.prompts_per_step=4", "ppo.samples_per_prompt=4", "ppo.generation.max_new_tokens=64",
        "ppo.generation.temperature=1.0", "ppo.generation.top_p=1.0", "ppo.minibatch_size=16",
        "ppo.micro_batch_size=16", "ppo.ppo_epochs=1", "ppo.lr=1e-5", "ppo.lr_scheduler=constant",
        "ppo.kl.mode=fixed", "ppo.kl.init_coef=0.04", "ppo.init_adapter=null", "ppo.steps=1000",
        *opts.override])
    ppo, kl_coef = cfg.ppo, cfg.ppo.kl.init_coef
    learner = Learner(cfg)
    learner.setup("127.0.0.1", 29500, 0)
    batch = make_batch(Batch, Sample, ppo.prompts_per_step, ppo.samples_per_prompt, ppo.generation.max_new_tokens,
                       json.loads((opts.model_dir / "config.json").read_text())["vocab_size"], 0)
    scores = torch.rand(len(batch), generator=torch.Generator().manual_seed(1))
    first = learner.make_experience(batch, None)
    first = first if isinstance(first, dict) else first.tensors()
    noise = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(2)) * 1e-6
    batch = batch.replace(rollout_logprobs=(first["behaviour_logprobs"] + noise) * batch.response_mask)
    new_api = hasattr(batch, "for_learner")
    try:  # since 2026-12-07: no proximal pass of its own when the update is one optimizer step
        from medrl.ppo.algos import proximal_pass_needed
        proximal = {"proximal": proximal_pass_needed(len(batch), ppo)}
    except ImportError:
        proximal = {}
    if new_api:
        batch = batch.replace(scores=scores, dropped=torch.zeros(len(batch), dtype=torch.bool))

    def one_step(step: int, times: dict[str, list[float]]) -> None:
        def timed(phase, fn, *args):
            w, c = time.perf_counter(), time.process_time()
            out = fn(*args)
            times[f"{phase}_wall"].append(time.perf_counter() - w)
            times[f"{phase}_cpu"].append(time.process_time() - c)
            return out

        def experience():  # the version that drew the samples: the live one, or (async) the one before it
            version = step - (2 if ppo.async_rollout else 1)
            out = learner.make_experience(batch.for_learner() if new_api else batch, version if version >= 0 else None,
                                          **proximal)
            return batch.replace(**out) if isinstance(out, dict) else out

        def advantages(b):
            if new_api:
                return algos.advantages_and_weights(ppo, b, kl_coef)[0]
            added, _ = algos.advantages_and_weights(
                ppo, scores=scores, group=torch.tensor([s.prompt_index for s in b.samples or []]) if getattr(
                    b, "samples", None) else torch.arange(len(b)) // ppo.samples_per_prompt,
                mask=b.response_mask, old_logprobs=b.old_logprobs, ref_logprobs=b.ref_logprobs,
                behaviour_logprobs=b.behaviour_logprobs, values=b.values, kl_coef=kl_coef,
                finished=getattr(b, "finished", None))
            return b.replace(**added)

        b = timed("experience", experience)
        b = timed("advantages", advantages, b)
        metrics = timed("train", learner.train, b.for_learner() if new_api else b, 1, step, kl_coef)
        timed("publish", learner.adapter_state, step)
        times.setdefault("policy_loss", []).append(metrics.get("policy_loss", float("nan")))

    scratch: dict[str, list[float]] = {f"{ph}_{k}": [] for ph in PHASES for k in ("wall", "cpu")}
    for step in range(opts.warmup):
        one_step(step, scratch)
    times: dict[str, list[float]] = {f"{ph}_{k}": [] for ph in PHASES for k in ("wall", "cpu")}
    prof = cProfile.Profile() if opts.profile else None
    if prof:
        prof.enable()
    for step in range(opts.warmup, opts.warmup + opts.repeats):
        one_step(step, times)
    if prof:
        prof.disable()
        prof.dump_stats(str(opts.profile))
    med = {k: statistics.median(v) for k, v in times.items() if k != "policy_loss"}
    learn_wall = [sum(times[f"{ph}_wall"][i] for ph in PHASES) for i in range(opts.repeats)]
    learn_cpu = [sum(times[f"{ph}_cpu"][i] for ph in PHASES) for i in range(opts.repeats)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {opts.repeats} repeats, medians (s):")
    print("  " + "  ".join(f"{ph} {med[ph + '_wall']:.3f}/{med[ph + '_cpu']:.3f}" for ph in PHASES)
          + "   (wall/cpu)")
    print(f"  learn wall {statistics.median(learn_wall):.3f}  cpu {statistics.median(learn_cpu):.3f}  "
          f"min cpu {min(learn_cpu):.3f}; last policy_loss {times['policy_loss'][-1]!r}")
    if opts.json:
        opts.json.write_text(json.dumps({"times": times, "learn_wall": learn_wall, "learn_cpu": learn_cpu}))


if __name__ == "__main__":
    main()
