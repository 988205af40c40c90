"""The PPO driver end to end on the tiny model with real Ray actors: weight sync and log-prob consistency, a killed
rollout actor, a two-rank DeepSpeed learner over gloo, exact resume."""
import json
import math
import shutil

import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

from medrl.errors import ConfigError, UsageError
from medrl.models.chat import render_prompt
from medrl.ppo.algos import advantages_and_weights
from medrl.models.generation import Sample
from medrl.ppo.batch import Batch, load_prompts, prompts_at
from medrl.ppo.checkpoint import complete_checkpoints
from medrl.ppo.driver import PPOTrainer, run_ppo
from medrl.runs import read_metrics
from conftest import free_port
from ppo_setup import PROMPTS, ppo_config, weights_digests

pytestmark = pytest.mark.slow


def _gap(batch, logprobs):
    return float(((batch.rollout_logprobs - logprobs).abs() * batch.response_mask).max())


def test_sync_killed_rollout_and_two_rank_deepspeed(tiny_model_dir, tmp_path, ray_local, monkeypatch):
    """One trainer (two rollout actors, two DeepSpeed ZeRO-2 learner ranks over gloo, a judge nobody listens for)
    through four steps."""
    monkeypatch.setenv("MEDRL_TEST_JUDGE_KEY", "sk-test")
    judge = [f"reward.judge.base_url=http://127.0.0.1:{free_port()}/v1", "reward.judge.provider=openai",
             "reward.judge.api_key_env=MEDRL_TEST_JUDGE_KEY", "reward.judge.max_retries=0",
             "reward.judge.malformed_retries=0", "reward.judge.timeout_s=5", "reward.judge.on_failure=rules_only"]
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "sync", "ppo.estimator=gae", "ppo.steps=3",
                          "ppo.rollout.num_actors=2", "ppo.rollout.num_cpus=0.4", "ppo.micro_batch_size=4",
                          "ppo.learner.ranks=2", "ppo.learner.deepspeed=configs/deepspeed/zero2.json", *judge)
    with PPOTrainer(cfg, run) as tr:
        learners, rollouts = tr.groups.learner.actors, tr.groups.rollout.actors
        for info in tr.groups.learner.info:
            assert info["num_processes"] == info["world_size"] == 2
            assert info["distributed_type"] == "DistributedType.DEEPSPEED"
        initial = tr.adapter_ref
        before = weights_digests(learners[0])[0]
        first = tr.step()
        assert first["logprob_gap"] < 1e-4 and first["samples"] == 16 and first["grad_norm"] > 0
        digests = weights_digests(*learners)
        assert digests[0] == digests[1] != before  # both ranks hold the same, updated weights

        # the update moved the policy, so a rollout actor still holding the initial adapter would be caught:
        # its log-probs of its own samples differ from the learner's by far more than the tolerance
        text = render_prompt(tr.tokenizer, cfg.model.system_prompt, PROMPTS[0][1])
        stale = ray.get(rollouts[0].generate.remote([(0, text)], 4, 7, [initial], -1))
        batch = Batch.pack(stale["samples"], tr.tokenizer.pad_token_id)
        learner_lp = ray.get(learners[0].make_experience.remote(batch.for_learner()))["old_logprobs"]
        assert _gap(batch, learner_lp) > 1e-2

        # a rollout actor dies between steps: Ray restarts it, the driver re-syncs it, the step completes
        ray.kill(rollouts[1], no_restart=False)
        second = tr.step()
        assert second["rollout_restarts"] == 1
        assert second["samples"] == 16 and second["logprob_gap"] < 1e-4

        # a call that reaches a freshly restarted actor brings the adapter reference along: the actor reloads the
        # current weights by itself and redoes the work exactly as a healthy actor does
        args = ([(0, text), (1, text)], 2, 11, [tr.adapter_ref], tr.version)
        ray.get([r.load_adapter.remote(tr.adapter_ref, tr.version) for r in rollouts])
        healthy = ray.get(rollouts[1].generate.remote(*args))
        ray.kill(rollouts[0], no_restart=False)
        redone = ray.get(rollouts[0].generate.remote(*args))
        assert redone["reloaded"] and not healthy["reloaded"] and redone["pid"] != healthy["pid"]
        assert [s.response_ids for s in redone["samples"]] == [s.response_ids for s in healthy["samples"]]
        for x, y in zip(redone["samples"], healthy["samples"]):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
        third = tr.step()
        assert third["rollout_restarts"] == 1 and third["logprob_gap"] < 1e-4

        # a non-finite loss on one rank only: both ranks agree to skip the update (DeepSpeed discards the
        # gradients in its step), the weights stay identical and unchanged, and the next clean update trains
        out = ray.get(rollouts[0].generate.remote([(0, text), (1, text)], 4, 13, [tr.adapter_ref], tr.version))
        batch = tr.groups.learner.make_experience(Batch.pack(out["samples"], tr.tokenizer.pad_token_id),
                                                  tr.version).result()
        batch, _ = advantages_and_weights(cfg.ppo, batch.replace(scores=torch.arange(8.0)), 0.001)
        clean = [batch.take(rows).for_learner() for rows in batch.shard_rows(2)]
        nan_advantages = clean[1].advantages.clone()
        nan_advantages[2, 0] = float("nan")
        shards = [clean[0], clean[1].replace(advantages=nan_advantages)]
        before = weights_digests(*learners)
        skipped = ray.get([a.train.remote(s, 1, 5) for a, s in zip(learners, shards)])
        assert [m["nonfinite_skipped"] for m in skipped] == [1, 1]
        assert weights_digests(*learners) == before
        trained = ray.get([a.train.remote(s, 1, 5) for a, s in zip(learners, clean)])
        assert [m["nonfinite_skipped"] for m in trained] == [0, 0] and trained[0]["grad_norm"] > 0
        after = weights_digests(*learners)
        assert after[0] == after[1] != before[0] and all(math.isfinite(v) for v in after[0].values())
        tr._publish_adapter()  # as the driver does after an update: the rollouts follow the new weights

        # DeepSpeed checkpoint round trip: partitioned optimizer state per rank, RNG per rank
        path = tr.save_checkpoint()
        assert (path / "deepspeed").is_dir() and (path / "rng_rank1.pt").is_file()
        saved = weights_digests(learners[0])[0]
        tr.step()
        tr.restore(path)
        assert weights_digests(*learners) == [saved, saved]
    rows = read_metrics(run, "ppo")
    assert [r["step"] for r in rows] == [1, 2, 3]  # the restore to step 3 rewound step 4's row: one history
    for r in rows:  # the unreachable judge: every sample is a counted failure, scored by the rules alone
        assert r["judge_failed"] == 16 and r["dropped"] == 0 and r["reward_mean"] == pytest.approx(r["reward/rule"])
    # the reward plane logged each PPO step as it logs a `medrl judge` run: the same per-step path
    reward_rows = read_metrics(run, "reward")
    assert [r["step"] for r in reward_rows] == [1, 2, 3, 4]
    assert reward_rows[2]["failed"] == sum(r["judge_failed"] for r in rows) > 0  # the pool's running totals
    for key in ("reward_mean", "reward_std", "reward/length", "kl", "kl_coef", "entropy", "clip_frac",
                "value_loss", "response_len", "judge_tokens_in", "judge_cost_usd", "cache_hit_rate",
                "time_generate_s", "time_reward_wait_s", "time_learn_s", "logprob_gap", "judge_failed",
                "zero_spread_groups", "zero_spread_frac", "nonfinite_skipped", "update_skipped"):
        assert key in rows[-1], key


def test_two_ranks_with_unequal_token_counts_update_as_one_rank(tiny_model_dir, tmp_path, ray_local):
    """Token-mean over the global token count (one all-reduce per minibatch): two plain-DDP ranks whose shards hold 9
    and 2 response tokens give the loss, the gradient and the update of one rank over the whole batch. Before, each
    rank divided by its own count and DDP averaged the two means, so each of the 2 tokens weighed 4.5x one of the 9."""
    from medrl.ppo.groups import LearnerGroup

    gen = torch.Generator().manual_seed(3)
    samples = [Sample(i // 2, i % 2, torch.randint(10, 500, (5,), generator=gen).tolist(),
                      torch.randint(10, 500, (n,), generator=gen).tolist(), "", True)
               for i, n in enumerate((8, 1, 1, 1))]
    batch = Batch.pack(samples, 0)
    rows = batch.shard_rows(2)
    assert [r.tolist() for r in rows] == [[0, 3], [1, 2]]
    assert [float(batch.response_mask[r].sum()) for r in rows] == [9.0, 2.0]
    results = []
    for ranks in (1, 2):
        cfg, _ = ppo_config(tmp_path, tiny_model_dir, f"ranks{ranks}", f"ppo.learner.ranks={ranks}",
                            "ppo.minibatch_size=4", "ppo.prompts_per_step=2", "ppo.samples_per_prompt=2")
        group = LearnerGroup(cfg, None, 0.0)
        try:
            scored = group.make_experience(batch, None).result()  # the live weights
            scored = scored.replace(scores=torch.tensor([1.0, 0.0, 0.2, 0.9]), rollout_logprobs=scored.old_logprobs)
            learned, _ = advantages_and_weights(cfg.ppo, scored, 0.001)
            metrics = group.train(learned, 1, 5, 0.001).result()
            digests = weights_digests(*group.actors)
        finally:
            group.close()
        assert all(d == digests[0] for d in digests)
        results.append((metrics, digests[0]))
    (one, w1), (two, w2) = results
    assert two["policy_loss"] == pytest.approx(one["policy_loss"], rel=1e-5, abs=1e-7)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4) and one["grad_norm"] > 0
    assert w1.keys() == w2.keys() and all(w2[k] == pytest.approx(w1[k], rel=1e-5) for k in w1)


@pytest.mark.parametrize("async_rollout", [False, True], ids=["sync", "async"])
def test_resume_two_plus_two_equals_four(async_rollout, tiny_model_dir, tmp_path, ray_local):
    """With async_rollout the checkpoint also holds the weights the next step samples with (one update behind)."""
    overrides = ("ppo.estimator=gae", "ppo.steps=4", "ppo.checkpoint.every=2", "ppo.checkpoint.keep_last=3",
                 f"ppo.async_rollout={str(async_rollout).lower()}")
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "straight", *overrides)
    out = run_ppo(cfg, run)
    behaviour = run.checkpoints("ppo") / "step_000002" / "behaviour_weights.pt"
    assert behaviour.is_file() == async_rollout
    assert not (run.checkpoints("ppo") / "step_000004" / "behaviour_weights.pt").exists()  # nothing runs ahead
    assert out == run.ppo_adapter and (out / "adapter_config.json").is_file() and (out / "value_head.pt").is_file()
    assert [p.name for p in complete_checkpoints(run.checkpoints("ppo"))] == ["step_000002", "step_000004"]
    # a self-contained adapter: base model by absolute path, tokenizer with the chat template, the model card
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_model_dir.resolve())
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == AutoTokenizer.from_pretrained(
        str(tiny_model_dir)).chat_template
    card = (out / "README.md").read_text()
    assert "Research use only, not for clinical decisions" in card and "- RL: gae, 4 steps" in card
    assert yaml.safe_load(run.stage_config_path("ppo").read_text())["ppo"]["steps"] == 4

    # a second run gets the step-2 checkpoint of the first, plus the debris of a crash: a half-written
    # checkpoint and a directory without its trainer state; resume=auto must skip both
    cfg2, run2 = ppo_config(tmp_path, tiny_model_dir, "resumed", *overrides)
    root2 = run2.checkpoints("ppo")
    shutil.copytree(run.checkpoints("ppo") / "step_000002", root2 / "step_000002")
    (root2 / "step_000003.tmp" / "adapter").mkdir(parents=True)
    shutil.copytree(run.checkpoints("ppo") / "step_000004", root2 / "step_000005")
    (root2 / "step_000005" / "trainer_state.json").unlink()
    run_ppo(cfg2, run2, resume="auto")

    rows = {r["step"]: r for r in read_metrics(run, "ppo")}
    rows2 = {r["step"]: r for r in read_metrics(run2, "ppo")}
    assert list(rows2) == [3, 4]
    lag = 1 if async_rollout else 0  # steps 2.. sample with the weights before the previous update
    assert [rows[s]["rollout_staleness"] for s in (1, 2, 3, 4)] == [0, lag, lag, lag]
    assert [rows2[s]["rollout_staleness"] for s in (3, 4)] == [lag, lag]
    # the learner scores every sample with the weights that drew it, also one update behind and after a resume
    assert max(r["logprob_gap"] for r in [*rows.values(), *rows2.values()]) < 1e-4
    samples = [[json.loads(x) for x in r.ppo_samples.read_text().splitlines()] for r in (run, run2)]
    later = [[(s["step"], s["id"], s["response"]) for s in rows if s["step"] > 2] for rows in samples]
    assert later[0] == later[1] and len(later[0]) == 32  # same prompts, in the same order, same samples
    a = load_file(run.ppo_adapter / "adapter_model.safetensors")
    b = load_file(run2.ppo_adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    init = load_file(run.checkpoints("ppo") / "step_000002" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.allclose(a[k], init[k]) for k in a)  # steps 3-4 did change the weights
    head_a, head_b = (torch.load(r.ppo_adapter / "value_head.pt") for r in (run, run2))
    assert torch.allclose(head_a["weight"], head_b["weight"], atol=1e-6)

    # asking for a specific checkpoint that is incomplete, or starting afresh over checkpoints, is a usage error
    with pytest.raises(UsageError, match="not a complete PPO checkpoint"):
        run_ppo(cfg2, run2, resume=str(root2 / "step_000003.tmp"))
    with pytest.raises(UsageError, match="checkpoints of an earlier run: continue it with --resume auto"):
        run_ppo(cfg2, run2)


def test_async_rollout_survives_a_rollout_actor_killed_while_it_runs_ahead(tiny_model_dir, tmp_path, ray_local):
    """The actor dies while (or just after) generating the next step's samples: Ray restarts it, the call is redone
    with the adapter version it names, and the lagged samples still match the learner's behaviour weights."""
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "async-kill", "ppo.steps=3", "ppo.async_rollout=true",
                          "ppo.log_samples=false")
    with PPOTrainer(cfg, run) as tr:
        first = tr.step()
        assert tr._ahead is not None and tr._ahead.version == tr.version - 1  # step 2 runs ahead, one version back
        ray.kill(tr.groups.rollout.actors[0], no_restart=False)
        second, third = tr.step(), tr.step()
    # counted at step 2 if the kill lost its call, else at step 3, whose call reaches the restarted actor
    assert second["rollout_restarts"] + third["rollout_restarts"] == 1
    for m in (first, second, third):
        assert m["samples"] == 16 and m["logprob_gap"] < 1e-4
    assert [m["rollout_staleness"] for m in (first, second, third)] == [0, 1, 1]


def test_failed_judgements_leave_their_group_and_the_loss(tiny_model_dir, tmp_path, ray_local, monkeypatch, caplog):
    """The loopback judge fails every request for two of the four prompts (a fault marker in the question): by
    default (``on_failure: drop``) their 8 samples are unscored, out of the baselines and the loss, counted and
    warned about; ``rules_only``, chosen explicitly, trains on them with R = Rule next to teacher-scored samples."""
    from medrl.testing.loopback_server import LoopbackJudge

    monkeypatch.setenv("MEDRL_TEST_JUDGE_KEY", "sk-test-loopback")
    rows = []
    with LoopbackJudge(api_key="sk-test-loopback") as srv:
        for on_failure in (None, "rules_only"):
            judge = ["reward.judge.provider=openai", f"reward.judge.base_url={srv.base_url}",
                     "reward.judge.api_key_env=MEDRL_TEST_JUDGE_KEY", "reward.judge.max_retries=0",
                     "reward.judge.malformed_retries=0", "reward.judge.rpm=0", "reward.judge.tpm=0"]
            if on_failure:
                judge.append(f"reward.judge.on_failure={on_failure}")
            cfg, run = ppo_config(tmp_path, tiny_model_dir, f"fail-{on_failure}", "ppo.steps=1", *judge)
            with open(run.data / "rl_prompts.jsonl", "w", encoding="utf-8") as f:
                for pid, prompt, risk, lang in PROMPTS[:4]:
                    fault = " [[fault:500]]" if pid in ("p2", "p4") else ""
                    f.write(json.dumps({"id": pid, "prompt": prompt + fault, "reference": None, "risk": risk,
                                        "language": lang}, ensure_ascii=False) + "\n")
            with PPOTrainer(cfg, run) as tr:
                rows.append(tr.step())
            samples = [json.loads(x) for x in run.ppo_samples.read_text(encoding="utf-8").splitlines()]
            assert {s["id"] for s in samples if s["judge_status"] == "failed"} == {"p2", "p4"}
            assert {s["id"] for s in samples if s["dropped"]} == (set() if on_failure else {"p2", "p4"})
    dropped, kept = rows
    assert (dropped["judge_failed"], dropped["dropped"], dropped["samples"]) == (8, 8, 8)
    assert dropped["judge_unscored_frac"] == 0.5 and dropped["update_skipped"] == 0
    assert "step 1: 50% of the samples were left unscored" in caplog.text
    # the samples learned from all have a teacher score: one scale in every baseline
    assert dropped["reward/teacher"] > 0 and dropped["reward_mean"] != pytest.approx(dropped["reward/rule"])
    assert (kept["judge_failed"], kept["dropped"], kept["samples"], kept["judge_unscored_frac"]) == (8, 0, 16, 0.0)


def test_prompt_order_is_a_function_of_position():
    rows = [{"id": str(i)} for i in range(5)]
    stream = [r["id"] for r in prompts_at(rows, 0, 15, seed=3)]
    assert all(sorted(stream[e * 5:(e + 1) * 5]) == list("01234") for e in range(3))  # each epoch: every prompt once
    assert stream[:5] != stream[5:10]  # a fresh shuffle per epoch
    assert [r["id"] for r in prompts_at(rows, 7, 4, seed=3)] == stream[7:11]  # resuming at 7 continues the stream
    assert [r["id"] for r in prompts_at(rows, 0, 5, seed=4)] != stream[:5]


def test_bad_inputs_fail_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match="samples_per_prompt.*must be >= 2 for estimator .rloo."):
        ppo_config(tmp_path, tmp_path, "bad", "ppo.estimator=rloo", "ppo.samples_per_prompt=1")
    bad = tmp_path / "rl_prompts.jsonl"
    bad.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"rl_prompts.jsonl:2: key 'prompt'"):
        load_prompts(bad)
    with pytest.raises(UsageError, match="run `medrl prepare` first"):
        load_prompts(tmp_path / "missing.jsonl")


def test_actor_resources_that_cannot_fit_fail_at_once(tiny_model_dir, tmp_path, ray_local):
    from medrl.ppo.preflight import check_actor_resources

    cfg, _ = ppo_config(tmp_path, tiny_model_dir, "fits")
    assert check_actor_resources(cfg) == (0.0, 0.0)  # CPU run: no GPU shares
    cfg, _ = ppo_config(tmp_path, tiny_model_dir, "too_big", "ppo.learner.num_cpus=1", "ppo.rollout.num_cpus=1")
    with pytest.raises(UsageError, match=r"PPO asks for 2.1 CPUs .* but the Ray cluster has 2; lower those shares"):
        check_actor_resources(cfg)


def test_zero_spread_groups_are_filtered_and_the_update_skipped(tiny_model_dir, tmp_path, ray_local):
    """Every rule weighted 0: every sample scores 0, so every group has zero spread; with the filter on the step
    has nothing to learn and skips its update (counted), the weights untouched."""
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "flat", "ppo.steps=1", "reward.rules.length.weight=0",
                          "ppo.filter_zero_spread_groups=true", "ppo.log_samples=false")
    with PPOTrainer(cfg, run) as tr:
        learner = tr.groups.learner.actors[0]
        before = weights_digests(learner)[0]
        m = tr.step()
        assert weights_digests(learner)[0] == before
    assert (m["update_skipped"], m["samples"], m["zero_spread_groups"], m["zero_spread_frac"]) == (1, 0, 4, 1.0)
    assert m["reward_mean"] == 0.0 and [r["update_skipped"] for r in read_metrics(run, "ppo")] == [1]
