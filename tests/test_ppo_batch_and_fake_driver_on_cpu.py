"""The typed batch (pack / take / shard_rows / put_rows, token-balanced equal shards, rewards with their rows) and one PPO driver's bookkeeping over
three async steps, and over a step with nothing to learn, with fake actor groups: no Ray, no model (the tiny model's
tokenizer renders the prompts)."""
import json
import math

import pytest
import torch

from medrl.models.generation import Sample
from medrl.ppo.batch import Batch, load_prompts, prompts_at
from medrl.ppo.driver import PPOTrainer
from medrl.reward.types import RewardResult
from medrl.runs import read_metrics
from ppo_setup import ppo_config


def test_batch_pack_take_shard_put_rows():
    samples = [Sample(0, 0, [1, 2], [7], "a", True, [-0.5]),
               Sample(0, 1, [1, 2, 3], [8, 9, 9], "b", False, [-1.0, -2.0, -3.0]),
               Sample(1, 0, [1], [], "", False),
               Sample(1, 1, [4, 5], [6, 6], "d", True, [-0.25, -0.75])]
    b = Batch.pack(samples, pad_id=99)
    assert b.input_ids.tolist() == [[1, 2, 7, 99, 99, 99], [1, 2, 3, 8, 9, 9], [1, 99, 99, 99, 99, 99],
                                    [4, 5, 6, 6, 99, 99]]
    assert b.attention_mask.sum(1).tolist() == [3, 6, 1, 4] and b.prompt_lens.tolist() == [2, 3, 1, 2]
    assert b.response_ids.tolist() == [[7, 99, 99], [8, 9, 9], [99, 99, 99], [6, 6, 99]]
    assert b.response_mask.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]]
    assert b.rollout_logprobs.tolist() == [[-0.5, 0, 0], [-1, -2, -3], [0, 0, 0], [-0.25, -0.75, 0]]
    assert b.group.tolist() == [0, 0, 1, 1] and b.finished.tolist() == [True, False, False, True]
    assert b.samples == samples and b.old_logprobs is None and b.scores is None and len(b) == 4

    # take: the rows, in the order asked, padding columns they do not need trimmed
    t = b.take(torch.tensor([3, 0]))
    assert t.input_ids.tolist() == [[4, 5, 6, 6], [1, 2, 7, 99]] and t.response_ids.tolist() == [[6, 6], [7, 99]]
    assert t.prompt_lens.tolist() == [2, 2] and t.pad_id == 99 and t.samples == [samples[3], samples[0]]

    # rewards travel with their rows (and so through take); the learner ranks get the tensors only
    results = [RewardResult(id=str(i), reward=r, rule=r, teacher=None, dropped=i == 2)
               for i, r in enumerate((1.0, 0.25, 0.0, 0.5))]
    scored = b.with_rewards(results)
    assert scored.scores.dtype == torch.float32 and scored.dropped.tolist() == [False, False, True, False]
    t = scored.take(torch.tensor([3, 0]))
    assert t.scores.tolist() == [0.5, 1.0] and t.results == [results[3], results[0]]
    assert scored.for_learner().results is None and scored.for_learner().samples is None
    assert set(scored.tensors()) == set(scored.for_learner().tensors()) and "results" not in scored.tensors()

    # shards: 2 rows each; by tokens (3, 6, 1, 4) longest first: 6 -> shard 0, 4 -> 1, 3 -> 1 (4 < 6), 1 -> 0 (full
    # shard 1): 7 + 7 tokens, where contiguous blocks would give 9 + 5
    rows = b.shard_rows(2)
    assert [r.tolist() for r in rows] == [[1, 2], [0, 3]]
    assert [r.tolist() for r in b.shard_rows(1)] == [[0, 1, 2, 3]]
    assert [r.tolist() for r in b.shard_rows(4)] == [[1], [3], [0], [2]]
    shards = [b.take(r) for r in rows]
    assert [tuple(s.input_ids.shape) for s in shards] == [(2, 6), (2, 4)]
    assert [tuple(s.response_ids.shape) for s in shards] == [(2, 3), (2, 2)]
    with pytest.raises(ValueError, match="4 rows do not split into 3 equal shards"):
        b.shard_rows(3)

    # put_rows puts each shard's computed token fields back at their rows, 0 past the shard's width: exact
    parts = [{"old_logprobs": (s.rollout_logprobs + 1) * s.response_mask} for s in shards]
    back = b.put_rows(rows, parts)
    assert torch.equal(back.old_logprobs, (b.rollout_logprobs + 1) * b.response_mask)
    for name, value in b.tensors().items():
        assert getattr(back, name) is value, name  # the rest is the batch's own


# ---------------------------------------------------------------------------------------------- fake groups
class Done:
    """A finished call of a fake group."""

    def __init__(self, value):
        self.value = value


class FakePending:
    def __init__(self, value):
        self.refs, self._value = [Done(value)], value

    def result(self):
        return self._value


def response_len(prompt_index: int, sample_index: int) -> int:
    return 1 + (prompt_index + sample_index) % 3


class FakeRollout:
    """Samples of ``response_len`` tokens, each with log-prob -0.5; the call of the second generate's first
    micro-batch comes back from a restarted engine."""

    def __init__(self):
        self.calls = []

    def generate(self, chunks, n, seeds, adapter_ref, version):
        refs = {}
        for c, chunk in enumerate(chunks):
            restarted = c == 0 and len(self.calls) == len(chunks)
            self.calls.append((seeds[c], adapter_ref, version, [i for i, _ in chunk]))
            samples = [Sample(i, s, [1, 2, 3], [10 + s] * response_len(i, s), f"answer {i}.{s}", s == 0,
                              [-0.5] * response_len(i, s)) for i, _ in chunk for s in range(n)]
            refs[Done({"samples": samples, "reloaded": restarted, "pid": 101 if restarted else 100,
                       "generate_s": 0.5})] = c
        return refs

    def receive(self, ref, chunk):
        return ref.value, ref.value["pid"] != 100


class FakeLearner:
    """Behaviour log-probs 2^-10 above the engine's, old ones 0.25 below those (asked for a proximal pass),
    reference 0.5 below behaviour."""

    def __init__(self):
        self.experience_versions, self.proximal, self.trained, self.published = [], [], [], []

    def make_experience(self, batch, version, proximal):
        self.experience_versions.append(version)
        self.proximal.append(proximal)
        mask = batch.response_mask
        behaviour = batch.rollout_logprobs + 2 ** -10 * mask
        old = behaviour - 0.25 * mask if proximal else None
        return FakePending(batch.replace(old_logprobs=old, behaviour_logprobs=behaviour,
                                         ref_logprobs=behaviour - 0.5 * mask))

    def train(self, batch, n_minibatches, seed, kl_coef):
        assert batch.advantages is not None and batch.behaviour_logprobs is not None and batch.loss_mask is not None
        assert batch.rollout_weights is None  # rollout_correction.mode none (the hf engine's default)
        self.trained.append((len(batch), n_minibatches, seed))
        return FakePending({"policy_loss": 0.5, "grad_norm": 1.0, "lr": 0.02, "nonfinite_skipped": 0,
                            "behaviour_weight_mean": 0.75})

    def adapter(self, version):
        self.published.append(version)
        return f"adapter-v{version}"


class FakeGroups:
    """Rewards 1.0 for sample 0 of a prompt and 0.25 for the others; the reward plane drops ``drop``. ``wait_any``
    answers the last call it is given: a rollout running ahead goes to the judge while the step waits."""

    def __init__(self, drop: str | set[str], flat: bool = False):  # flat: every sample scores 0.5
        self.learner, self.rollout, self.flat = FakeLearner(), FakeRollout(), flat
        self.drop = {drop} if isinstance(drop, str) else drop
        self.submitted, self.closed = [], False

    def wait_any(self, refs):
        return refs[-1]

    def wait_all(self, refs):
        assert all(isinstance(r, Done) for r in refs)

    def submit_rewards(self, items):
        self.submitted += [item.id for item in items]
        return [Done(RewardResult(id=x.id, reward=0.5 if self.flat else 1.0 if x.id.endswith(":0") else 0.25,
                                  rule=0.0, teacher=None, components={"rule": 0.5}, dropped=x.id in self.drop))
                for x in items]

    def rewards(self, items, refs):
        assert [r.value.id for r in refs] == [x.id for x in items]
        return [r.value for r in refs], 0

    def reward_stats(self):  # the ledger's cumulative rate-limit waits: 1.5 s more per step
        self.waited = getattr(self, "waited", 0.0) + 1.5
        return {"rate_wait_call_s": self.waited, "rate_limited_calls": int(self.waited)}

    def close(self):
        self.closed = True


def test_one_async_step_bookkeeping_with_fake_groups(tiny_model_dir, tmp_path):
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "fake", "ppo.steps=3", "ppo.async_rollout=true",
                          "ppo.learner.ranks=2", "ppo.estimator=grpo")
    records = [prompts_at(load_prompts(run.data / "rl_prompts.jsonl"), 4 * s, 4, seed=1) for s in range(3)]
    drop = f"{records[0][0]['id']}:1:3"  # step 1, prompt 0, sample 3
    groups = FakeGroups(drop)
    with PPOTrainer(cfg, run, groups=groups) as tr:
        assert tr.version == 1 and groups.learner.published == [1]
        first = tr.step()
        # step 2's rollout was dispatched with the weights before step 1's update, and its micro-batches went to
        # the judge while step 1 waited for its rewards
        assert tr._ahead.version == 1 and tr.version == 2 and not tr._ahead.pending
        assert len(groups.submitted) == 32 and sum(":2:" in x for x in groups.submitted) == 16
        second, third = tr.step(), tr.step()
        assert tr._ahead is None  # nothing runs past the last step
    assert groups.closed

    steps = (first, second, third)
    assert [m["data_position"] for m in steps] == [4, 8, 12]
    assert [m["judge_rate_wait_s"] for m in steps] == [1.5, 1.5, 1.5]  # per step, from the cumulative totals
    assert [m["rollout_staleness"] for m in steps] == [0, 1, 1]
    assert groups.learner.experience_versions == [1, 1, 2] and groups.learner.published == [1, 2, 3, 4]
    assert groups.learner.proximal == [True] * 3  # two minibatches per step: the proximal pass is needed
    # two micro-batches of 2 prompts per step, seeds from (run seed, step, chunk), the adapter of the version
    assert groups.rollout.calls == [
        ((1_000_003 + s * 1_009 + c) % 2**31, f"adapter-v{v}", v, [2 * c, 2 * c + 1])
        for s, v in ((1, 1), (2, 1), (3, 2)) for c in (0, 1)]
    assert [m["rollout_restarts"] for m in steps] == [0, 1, 0]
    # the samples the reward plane received: each prompt's, in the step's prompt order
    assert sorted(groups.submitted[:16]) == sorted(f"{r['id']}:1:{s}" for r in records[0] for s in range(4))
    assert {x.split(":")[0] for x in groups.submitted[32:]} == {r["id"] for r in records[2]}

    # step 1: one sample dropped, 15 left, cut to 14 for two equal shards; the cut one is the last row (prompt 3,
    # sample 3, reward 0.25): rewards 1 + 0.25 * 2 (prompt 0), 1.75 (prompts 1, 2), 1.5 (prompt 3) over 14
    assert [t[0] for t in groups.learner.trained] == [14, 16, 16]
    assert first["samples"] == 14 and first["dropped"] == 1 and second["dropped"] == 0
    assert first["judge_unscored_frac"] == 1 / 16 and second["judge_unscored_frac"] == 0.0
    assert first["reward_mean"] == pytest.approx(6.5 / 14) and second["reward_mean"] == pytest.approx(0.4375)
    assert first["finished_frac"] == pytest.approx(4 / 14) and second["finished_frac"] == 0.25
    # 16 samples of response_len tokens: (1+2+3+1) + (2+3+1+2) + (3+1+2+3) + (1+2+3+1) = 31
    assert second["response_len"] == pytest.approx(31 / 16)
    assert second["kl"] == pytest.approx(0.5) and second["kl_seq_sum"] == pytest.approx(0.5 * 31 / 16)
    assert second["behaviour_weight_mean"] == 0.75  # the learner's figure (the loss computes the weights)
    assert second["logprob_gap"] == 2 ** -10 and second["kl_coef"] == 0.001
    # the learner's behaviour log-probs exceed the engine's by 2^-10 on every token: rho = e^(2^-10), its k3 KL
    # e^x - 1 - x; measured, not applied (rollout_correction.mode none with the hf engine)
    x = 2 ** -10
    assert second["rollout_is_mean"] == pytest.approx(math.exp(x)) == second["rollout_is_max"]
    assert second["rollout_kl"] == pytest.approx(math.exp(x) - 1 - x, rel=1e-2)
    assert 0 < second["logprob_gap_mean"] <= 2 ** -10 and second["time_engine_sleep_s"] == 0.0  # hf: no sleep
    assert second["time_actor_generate_s"] == 1.0
    # minibatches: ceil(16 / 8) = 2 (at most 8 rows per rank); seeds from (run seed, step)
    assert [t[1:] for t in groups.learner.trained] == [(2, 100_003 + s) for s in (1, 2, 3)]
    assert set(second) == {
        "reward_mean", "reward_std", "reward/rule", "judge_failed", "dropped", "judge_unscored_frac", "judge_tokens_in",
        "judge_tokens_out", "judge_cost_usd", "cache_hit_rate", "rollout_kl", "rollout_is_mean", "rollout_is_max",
        "policy_loss", "grad_norm", "lr", "nonfinite_skipped",
        "truncated_masked", "zero_spread_groups", "zero_spread_frac", "update_skipped",
        "behaviour_weight_mean", "kl", "kl_seq_sum", "advantage_mean", "return_mean", "kl_coef", "logprob_gap",
        "logprob_gap_mean", "time_engine_sleep_s", "response_len", "finished_frac", "samples", "rollout_restarts", "reward_retries", "rollout_staleness",
        "time_generate_s", "time_rollout_s", "time_actor_generate_s", "time_reward_wait_s",
        "time_experience_s", "time_advantages_s", "time_train_s", "time_publish_s", "time_learn_s", "time_step_s",
        "data_position", "judge_rate_wait_s"}
    assert second["time_learn_s"] == pytest.approx(sum(second[f"time_{phase}_s"] for phase in (
        "experience", "advantages", "train", "publish")))
    logged = run.ppo_samples.read_text(encoding="utf-8").splitlines()
    assert len(logged) == 48 and sum('"dropped": true' in line for line in logged) == 1


def test_a_step_with_zero_reward_spread_logs_and_skips_its_update_with_fake_groups(tiny_model_dir, tmp_path, caplog):
    """Every group scores 0.5 throughout and ``filter_zero_spread_groups`` is on: nothing to learn, so no train call
    and no new adapter version; the step still checks the weight sync over every sample, moves the data position
    and logs one row with the rollout and judge figures (the dropped sample counted, not in the reward mean)."""
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "fake-flat", "ppo.steps=2", "ppo.estimator=grpo",
                          "ppo.filter_zero_spread_groups=true")
    first_id = prompts_at(load_prompts(run.data / "rl_prompts.jsonl"), 0, 1, seed=1)[0]["id"]
    groups = FakeGroups(f"{first_id}:1:2", flat=True)
    with PPOTrainer(cfg, run, groups=groups) as tr:
        m = tr.step()
        assert tr.version == 1 and groups.learner.published == [1] and groups.learner.trained == []
        assert tr.data_position == 4 and tr._ahead is None
    assert "step 1: every group had zero reward spread: update skipped" in caplog.text
    assert (m["update_skipped"], m["samples"], m["dropped"], m["zero_spread_groups"], m["zero_spread_frac"]) == (
        1, 0, 1, 4, 1.0)
    assert m["reward_mean"] == 0.5 and m["reward_std"] == 0.0 and m["judge_rate_wait_s"] == 1.5
    assert m["logprob_gap"] == 2 ** -10 and m["rollout_staleness"] == 0 and m["rollout_restarts"] == 0
    assert m["time_learn_s"] == m["time_experience_s"] and m["time_step_s"] >= m["time_generate_s"] > 0
    assert set(m) == {
        "reward_mean", "reward_std", "reward/rule", "judge_failed", "dropped", "judge_unscored_frac", "judge_tokens_in",
        "judge_tokens_out", "judge_cost_usd", "cache_hit_rate", "zero_spread_groups", "zero_spread_frac",
        "update_skipped", "logprob_gap", "logprob_gap_mean", "time_engine_sleep_s", "samples", "rollout_restarts",
        "reward_retries", "rollout_staleness", "time_generate_s", "time_rollout_s", "time_actor_generate_s",
        "time_reward_wait_s", "time_experience_s", "time_learn_s", "time_step_s",
        "data_position", "judge_rate_wait_s"}  # none of the update's: advantages, losses, KL, response length
    logged = [json.loads(line) for line in run.ppo_samples.read_text(encoding="utf-8").splitlines()]
    assert len(logged) == 16 and [r["dropped"] for r in logged].count(True) == 1
    assert [r["update_skipped"] for r in read_metrics(run, "ppo")] == [1]


def test_a_step_with_fewer_samples_left_than_ranks_skips_its_update_and_says_why(tiny_model_dir, tmp_path, caplog):
    """Two learner ranks, and the reward plane dropped all but one of the 16 samples: no equal shards, no update."""
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "fake-one-left", "ppo.steps=1", "ppo.estimator=grpo",
                          "ppo.learner.ranks=2")
    records = prompts_at(load_prompts(run.data / "rl_prompts.jsonl"), 0, 4, seed=1)
    groups = FakeGroups({f"{r['id']}:1:{s}" for r in records for s in range(4)} - {f"{records[0]['id']}:1:0"})
    with PPOTrainer(cfg, run, groups=groups) as tr:
        m = tr.step()
    assert groups.learner.trained == [] and (m["update_skipped"], m["samples"], m["dropped"]) == (1, 0, 15)
    assert m["reward_mean"] == 1.0  # the one sample left, not learned from
    assert "step 1: fewer samples left than 2 ranks: update skipped" in caplog.text
    assert m["judge_unscored_frac"] == 15 / 16 and "step 1: 94% of the samples were left unscored" in caplog.text
