"""medrl PPO (GRPO estimator) vs trl's ``GRPOTrainer`` on CPU: samples/s and per-phase times.

Both sides train the same tiny Qwen3 (``medrl.models.tiny``) with the same fresh LoRA (``model.lora``), on the same
prompts in the same steps (``medrl prepare`` of ``configs/local_tiny.yaml``; trl reads medrl's prompt stream in
order), with the same prompts per step, group size, generation length, temperature, learning rate, KL coefficient
(0.04 against the adapter-disabled reference) and one forward/backward per step over the whole batch. The reward is
the same arithmetic on both sides:

  (a) rule   R = medrl's rule score (``reward.judge.provider=none``); trl gets a sync function computing it with
             ``medrl.reward.rules``.
  (b) judge  R = 0.6 * rule + 0.4 * teacher, the teacher from the loopback OpenAI-compatible judge
             (``medrl.testing.loopback_server``) answering after ``--latency`` seconds; trl gets an async reward
             function sending every completion of the batch to the same server at once (``openai.AsyncOpenAI``).

medrl runs as ``medrl ppo`` does (``run_ppo``: Ray local runtime, rollout/learner/judge actors, the rest of its
settings from ``configs/local_tiny.yaml``, including ``ppo.async_rollout: true``: the next step generates while this
one is judged and learned; ``--medrl-override ppo.async_rollout=false`` measures the on-policy loop). Each side runs
in its own process; the first step (warm-up) is left out of the rates. Every process runs one torch thread
(``OMP_NUM_THREADS=1`` unless set: on a shared 2-core machine more threads mostly spin; Ray gives medrl's actors one
each). Phase times: medrl's ``time_*_s`` metrics (generate = the part of the step spent waiting for its samples;
with async_rollout most of the generation ran during the step before); trl's measured around ``_generate`` and
``_calculate_rewards`` (learn = the rest of the step). Targets: >= 1.0x with (a), >= 2x with (b). Run it on an
otherwise idle machine: under load the multi-process side gets a larger share of the CPU and the ratios drift
upwards.

    .venv/bin/python bench/ppo_vs_trl.py --steps 11        # both rewards, ~4 min on 2 cores
    .venv/bin/python bench/ppo_vs_trl.py --only judge --medrl-override ppo.rollout.batch_size=1
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

JUDGE_KEY_ENV = "MEDRL_BENCH_JUDGE_KEY"
TARGETS = {"rule": 1.0, "judge": 2.0}
KL_COEF = 0.04
LR = 1e-5


def bench_config(opts, judge_url: str | None, name: str):
    """The medrl config both sides read their settings from."""
    from medrl.config import load_config

    b = opts.prompts_per_step * opts.group
    overrides = [
        f"run.root={opts.workdir}", f"run.name={name}", f"model.path={opts.model_dir}",
        "model.build_tiny_if_missing=false", "ppo.estimator=grpo", f"ppo.steps={opts.steps}",
        f"ppo.prompts_per_step={opts.prompts_per_step}", f"ppo.samples_per_prompt={opts.group}",
        f"ppo.generation.max_new_tokens={opts.max_new_tokens}", "ppo.generation.temperature=1.0",
        "ppo.generation.top_p=1.0", f"ppo.minibatch_size={b}", f"ppo.micro_batch_size={b}", "ppo.ppo_epochs=1",
        f"ppo.lr={LR}", "ppo.lr_scheduler=constant", "ppo.kl.mode=fixed", f"ppo.kl.init_coef={KL_COEF}",
        "ppo.init_adapter=null", "ppo.checkpoint.every=100000", "ppo.log_samples=false",
        # Ray CPU reservations that let learner, rollout and judge actors all start on 2 CPUs
        "ppo.learner.num_cpus=0.5", "ppo.rollout.num_cpus=0.5",
        f"reward.cache.path={opts.workdir}/{name}-judge-cache.sqlite",
        # the same work on both sides: single-turn prompts only (local_tiny also interviews consultation cases) and
        # R = 0.6 rule + 0.4 teacher (no per-criterion rubric calls for local_tiny's rubric prompts)
        "consult.cases_per_step=0", "reward.w_rubric=0",
    ]
    if judge_url:
        overrides += ["reward.judge.provider=openai", f"reward.judge.base_url={judge_url}",
                      f"reward.judge.api_key_env={JUDGE_KEY_ENV}", "reward.judge.budget_usd=null",
                      # trl has no rate limiter: medrl's stays on, not binding (the default 1200 rpm is 20 calls/s)
                      "reward.judge.rpm=60000", "reward.judge.tpm=60000000"]
    else:
        overrides.append("reward.judge.provider=none")
    return load_config(REPO / "configs" / "local_tiny.yaml", overrides + list(opts.medrl_override))


def prompt_rows(opts) -> list[dict]:
    from medrl.ppo.batch import load_prompts

    return load_prompts(Path(opts.workdir) / "prepared" / "data" / "rl_prompts.jsonl")


# --------------------------------------------------------------------------- trl side
def run_trl(opts, judge_url: str | None) -> dict:
    import asyncio

    import openai
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from medrl.models.chat import messages_for
    from medrl.models.loading import lora_config
    from medrl.ppo.batch import prompts_at
    from medrl.reward.rubric import JudgementError, build_messages, parse_judgement
    from medrl.reward.rules import evaluate_rules
    from medrl.reward.scoring import combine
    from medrl.reward.types import RewardInput

    cfg = bench_config(opts, judge_url, f"trl-{opts.reward}")
    rc, jc = cfg.reward, cfg.reward.judge
    # medrl's prompt stream (``prompts_at``: step k takes positions k*prompts_per_step...), read in order by trl
    # (shuffle_dataset=False): the same prompts in the same steps on both sides, so neither gets shorter prompts
    # (a step costs what its longest prompt costs: every row is padded to it)
    rows = prompts_at(prompt_rows(opts), 0, opts.steps * cfg.ppo.prompts_per_step, cfg.run.seed)
    data = Dataset.from_list([{"prompt": messages_for(cfg.model.system_prompt, r["prompt"]), "rid": r["id"],
                               "reference": r.get("reference"), "risk": r.get("risk") or "low",
                               "expected_behavior": r.get("expected_behavior")} for r in rows])

    def items(prompts, completions, rid, reference, risk, expected_behavior):
        return [RewardInput(id=i, prompt=p[-1]["content"], response=c[0]["content"], reference=ref, risk=rk,
                            expected_behavior=eb)
                for i, p, c, ref, rk, eb in zip(rid, prompts, completions, reference, risk, expected_behavior)]

    def rule_reward(prompts, completions, rid, reference, risk, expected_behavior, **_):
        batch = items(prompts, completions, rid, reference, risk, expected_behavior)
        return [combine(rc, it, evaluate_rules(it, rc.rules), None, "disabled").reward for it in batch]

    client = openai.AsyncOpenAI(base_url=judge_url, api_key=os.environ.get(JUDGE_KEY_ENV, ""),
                                max_retries=jc.max_retries, timeout=jc.timeout_s) if judge_url else None

    async def judged(item):
        rules = evaluate_rules(item, rc.rules)
        if rules.injected:
            return combine(rc, item, rules, None, "skipped").reward
        reply = await client.chat.completions.create(
            model=jc.model, messages=build_messages(item.prompt, rules.answer, item.reference),
            temperature=jc.temperature, max_tokens=jc.max_tokens, response_format={"type": "json_object"})
        try:
            judgement = parse_judgement(reply.choices[0].message.content)
        except JudgementError:
            judgement = None
        return combine(rc, item, rules, judgement, "ok" if judgement else "failed").reward

    async def judge_reward(prompts, completions, rid, reference, risk, expected_behavior, **_):
        batch = items(prompts, completions, rid, reference, risk, expected_behavior)
        return list(await asyncio.gather(*(judged(it) for it in batch)))

    phases = {"generate": 0.0, "score": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                phases["generate"] += time.perf_counter() - t0

        def _calculate_rewards(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super()._calculate_rewards(*args, **kwargs)
            finally:
                phases["score"] += time.perf_counter() - t0

    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            phases.update(generate=0.0, score=0.0, t0=time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - phases["t0"]
            steps.append({"step_s": total, "generate_s": phases["generate"], "score_s": phases["score"],
                          "learn_s": total - phases["generate"] - phases["score"]})

    ppo = cfg.ppo
    batch = ppo.prompts_per_step * ppo.samples_per_prompt
    args = GRPOConfig(
        output_dir=str(Path(opts.workdir) / "trl-out"), use_cpu=True, bf16=False, seed=cfg.run.seed,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=ppo.samples_per_prompt,
        max_completion_length=ppo.generation.max_new_tokens, temperature=ppo.generation.temperature,
        top_p=ppo.generation.top_p, learning_rate=LR, lr_scheduler_type="constant", beta=KL_COEF, num_iterations=1,
        max_steps=opts.steps, gradient_checkpointing=cfg.model.gradient_checkpointing, disable_dropout=True,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, shuffle_dataset=False)
    t0 = time.perf_counter()
    trainer = TimedGRPOTrainer(model=str(opts.model_dir), reward_funcs=judge_reward if judge_url else rule_reward,
                               args=args, train_dataset=data, peft_config=lora_config(cfg.model.lora),
                               callbacks=[StepTimer()])
    setup_s = time.perf_counter() - t0
    trainer.train()
    return {"side": "trl", "setup_s": setup_s, "samples_per_step": batch, "steps": steps,
            "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- medrl side
def run_medrl(opts, judge_url: str | None) -> dict:
    from medrl.ppo.driver import run_ppo
    from medrl.runs import RunDir, read_metrics, setup_logging

    cfg = bench_config(opts, judge_url, f"medrl-{opts.reward}")
    run = RunDir.from_config(cfg).ensure()
    setup_logging(run)
    shutil.copytree(Path(opts.workdir) / "prepared" / "data", run.data, dirs_exist_ok=True)
    t0 = time.perf_counter()
    run_ppo(cfg, run)
    wall = time.perf_counter() - t0
    rows = read_metrics(run, "ppo")
    steps = [{"step_s": r["time_step_s"], "generate_s": r["time_generate_s"], "score_s": r["time_reward_wait_s"],
              "learn_s": r["time_learn_s"], "samples": r["samples"]} for r in rows]
    return {"side": "medrl", "setup_s": wall - sum(s["step_s"] for s in steps),
            "samples_per_step": cfg.ppo.prompts_per_step * cfg.ppo.samples_per_prompt, "steps": steps}


# --------------------------------------------------------------------------- orchestration
def prepare(opts) -> None:
    """The tiny model and the prepared data, shared by every run."""
    from medrl.config import load_config
    from medrl.prepare.stage import run_prepare
    from medrl.models.tiny import build_tiny_model
    from medrl.runs import RunDir

    build_tiny_model(opts.model_dir)
    cfg = load_config(REPO / "configs" / "local_tiny.yaml",
                      [f"run.root={opts.workdir}", "run.name=prepared", f"model.path={opts.model_dir}"])
    run_prepare(cfg, RunDir.from_config(cfg))


def summarize(result: dict) -> dict:
    steady = result["steps"][1:] or result["steps"]
    total = sum(s["step_s"] for s in steady)
    samples = sum(s.get("samples", result["samples_per_step"]) for s in steady)
    phases = {k: sum(s.get(k, 0.0) for s in steady) / len(steady)
              for k in ("generate_s", "score_s", "learn_s")}
    return {"samples_per_s": samples / total, "step_s": total / len(steady), **phases}


def run_side(opts, side: str, reward: str, judge_url: str | None) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--reward", reward, "--workdir", str(opts.workdir),
           "--steps", str(opts.steps), "--prompts-per-step", str(opts.prompts_per_step), "--group", str(opts.group),
           "--max-new-tokens", str(opts.max_new_tokens)] + (["--judge-url", judge_url] if judge_url else [])
    cmd += [f"--medrl-override={o}" for o in opts.medrl_override]
    out_file = Path(opts.workdir) / f"{side}-{reward}.json"
    with open(Path(opts.workdir) / f"{side}-{reward}.log", "w") as log:
        proc = subprocess.run(cmd + ["--out", str(out_file)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{side} ({reward}) failed: see {log.name}")
    return json.loads(out_file.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="steps per run; the first is left out of the rates")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--latency", type=float, default=0.2, help="loopback judge latency in seconds")
    p.add_argument("--only", choices=("rule", "judge"), default=None)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    p.add_argument("--medrl-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra medrl config override (repeatable), e.g. ppo.rollout.batch_size=2")
    p.add_argument("--side", choices=("medrl", "trl"), help=argparse.SUPPRESS)  # internal: one run
    p.add_argument("--reward", choices=("rule", "judge"), help=argparse.SUPPRESS)
    p.add_argument("--judge-url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args()
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", JUDGE_KEY_ENV: "bench-judge-key"}.items():
        os.environ.setdefault(k, v)
    temp = opts.workdir is None
    opts.workdir = Path(tempfile.mkdtemp(prefix="medrl-vs-trl-")) if temp else opts.workdir.resolve()
    opts.model_dir = opts.workdir / "tiny-qwen3"
    if opts.side:
        result = (run_trl if opts.side == "trl" else run_medrl)(opts, opts.judge_url)
        opts.out.write_text(json.dumps(result))
        return

    from medrl.testing.loopback_server import LoopbackJudge

    try:
        prepare(opts)
        table = {}
        for reward in [opts.only] if opts.only else ["rule", "judge"]:
            judge = LoopbackJudge(latency_s=opts.latency, api_key=os.environ[JUDGE_KEY_ENV])
            with judge if reward == "judge" else contextlib.nullcontext():
                url = judge.base_url if reward == "judge" else None
                table[reward] = {side: summarize(run_side(opts, side, reward, url)) for side in ("trl", "medrl")}
        print(f"\n{opts.prompts_per_step} prompts x {opts.group} samples per step, {opts.max_new_tokens} new tokens, "
              f"{opts.steps - 1} timed steps; judge latency {opts.latency:g} s")
        print(f"{'reward':<7}{'medrl smp/s':>12}{'trl smp/s':>11}{'ratio':>7}{'target':>8}   "
              f"{'medrl gen/score/learn s':<31}{'trl gen/score/learn s'}")
        for reward, sides in table.items():
            m, t = sides["medrl"], sides["trl"]
            ratio = m["samples_per_s"] / t["samples_per_s"]
            print(f"{reward:<7}{m['samples_per_s']:>12.2f}{t['samples_per_s']:>11.2f}{ratio:>6.2f}x"
                  f"{TARGETS[reward]:>7.1f}x   "
                  f"{m['generate_s']:.2f}/{m['score_s']:.2f}/{m['learn_s']:.2f}{'':<17}"
                  f"{t['generate_s']:.2f}/{t['score_s']:.2f}/{t['learn_s']:.2f}")
        (opts.workdir / "summary.json").write_text(json.dumps(table, indent=1))
    finally:
        if temp:
            shutil.rmtree(opts.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
