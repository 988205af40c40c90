"""The learner's objective and the driver-side batch finalisation against hand-worked values; the non-finite guard
through a real learner rank (a Ray actor training the tiny model)."""
import math
from types import SimpleNamespace

import pytest
import torch

from medrl.config import load_config
from medrl.ppo.algos import advantages_and_weights, masked_mean, rows_to_learn
from medrl.models.generation import Sample
from medrl.ppo.batch import Batch
from medrl.ppo.objective import micro_batch_loss


def _ppo(*overrides):
    return load_config(None, [f"ppo.{o}" for o in overrides]).ppo


def _rows(logp, adv, mask, ref=None, behaviour=None, rollout_weights=None, old="copy"):
    """Minibatch rows: proximal log-probs a copy of ``logp`` (``old=None``: from the training forward), behaviour
    log-probs equal to them unless given (on-policy: decoupled weight 1)."""
    return SimpleNamespace(old_logprobs=logp.clone() if old == "copy" else old, advantages=adv, loss_mask=mask,
                           behaviour_logprobs=logp.clone() if behaviour is None else behaviour,
                           rollout_weights=rollout_weights, ref_logprobs=ref)


def test_kl_loss_term_by_hand():
    # ratio 1 everywhere: the PPO term is -A per token. Tokens: row 0 [A=1, A=1], row 1 [A=-2, padding].
    logp, mask = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0], [-1.5, 0.0]])  # log-ratios to the reference: 0, -1, 1
    mb = _rows(logp, adv, mask, ref)
    out = {"logprobs": logp}
    loss, info = micro_batch_loss(out, mb, _ppo("kl.placement=loss", "kl.estimator=k3"), 0.1, 3, 2)
    # policy: (-1 - 1 + 2) / 3 = 0; k3 = e^-r - 1 + r: r=0 -> 0, r=-1 -> e - 2, r=1 -> e^-1; token mean over 3
    k3 = (math.e - 2 + math.exp(-1)) / 3
    assert info["policy_loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert info["kl_loss"].item() == pytest.approx(k3, rel=1e-6) and loss.item() == pytest.approx(0.1 * k3, rel=1e-6)
    # the same term aggregated per sequence: row 0 (0 + e - 2) / 2, row 1 e^-1; mean over the 2 rows
    _, info = micro_batch_loss(out, mb, _ppo("kl.placement=loss", "kl.estimator=k3",
                                             "loss_agg_mode=seq-mean-token-mean"), 0.1, 3, 2)
    assert info["kl_loss"].item() == pytest.approx(((math.e - 2) / 2 + math.exp(-1)) / 2, rel=1e-6)
    # KL in the reward (the default): no loss term, no reference needed here
    loss, info = micro_batch_loss(out, _rows(logp, adv, mask), _ppo(), 0.1, 3, 2)
    assert "kl_loss" not in info and loss.item() == pytest.approx(0.0, abs=1e-7)
    # Dr. GRPO's constant normaliser: (-1 - 1 + 2) / (2 rows x 4) on the policy term; with A = 1 on all 3: -3 / 8
    _, info = micro_batch_loss(out, _rows(logp, torch.ones(2, 2), mask), _ppo(
        "loss_agg_mode=seq-mean-token-sum-norm", "loss_norm_len=4"), 0.0, 3, 2)
    assert info["policy_loss"].item() == pytest.approx(-3 / 8)


def _batch(mask, scores, group, old, ref=None, behaviour=None, rollout=None, finished=None, dropped=None):
    """A batch of these token and row fields (token ids and lengths only have their shapes: no model reads them)."""
    n, width = mask.shape
    return Batch(input_ids=torch.zeros(n, width + 1, dtype=torch.long), attention_mask=torch.ones(n, width + 1),
                 prompt_lens=torch.ones(n, dtype=torch.long), group=group,
                 finished=torch.ones(n, dtype=torch.bool) if finished is None else finished,
                 response_ids=torch.zeros(n, width, dtype=torch.long), response_mask=mask,
                 rollout_logprobs=old.clone() if rollout is None else rollout, old_logprobs=old,
                 behaviour_logprobs=old.clone() if behaviour is None else behaviour, ref_logprobs=ref, scores=scores,
                 dropped=torch.zeros(n, dtype=torch.bool) if dropped is None else dropped)


def _finish(ppo_cfg, old, ref, mask, scores, group, kl_coef, finished=None):
    return advantages_and_weights(ppo_cfg, _batch(mask, scores, group, old, ref, finished=finished), kl_coef)


def test_finish_kl_statistic_over_existing_tokens_and_placement():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])  # row 1: an empty response
    old = torch.tensor([[0.2, 0.4], [0.0, 0.0], [0.6, 0.0], [0.0, 0.0]])
    ref = torch.zeros(4, 2)
    scores, group = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1])
    added, stats = _finish(_ppo("estimator=dr_grpo", "kl.mode=fixed"), old, ref, mask, scores, group, 0.5)
    # k1 tokens .2 .4 .6 0 0 -> token mean 1.2 / 5 = .24 (the empty row counted as a zero KL gave .18 before)
    assert stats["kl"] == pytest.approx(0.24)
    # dr_grpo: group means .5 -> +-.5 on the last token; KL in the reward: -.5 * KL_t summed to go.
    # Row 0: token rewards [-.1, -.2 + .5] -> returns [.2, .3]; row 2: [-.3 + .5] -> [.2]
    assert torch.allclose(added.advantages[0], torch.tensor([0.2, 0.3]))
    assert torch.allclose(added.advantages[2], torch.tensor([0.2, 0.0]))
    # KL as a loss term: the advantages see the score alone
    added, _ = _finish(_ppo("estimator=dr_grpo", "kl.placement=loss"), old, ref, mask, scores, group, 0.5)
    assert torch.allclose(added.advantages[0], torch.tensor([0.5, 0.5]))
    # no reference (kl.init_coef=0): no KL at all, no statistic for the controller
    added, stats = _finish(_ppo("estimator=dr_grpo", "kl.init_coef=0"), old, None, mask, scores, group, 0.0)
    assert "kl" not in stats and torch.count_nonzero(added.kl) == 0


def test_truncated_responses_can_be_masked_out_of_the_loss():
    mask = torch.ones(4, 2)
    finished = torch.tensor([True, False, True, True])
    for on, expect in ((False, 0), (True, 1)):
        added, stats = _finish(_ppo(f"mask_truncated={str(on).lower()}"), torch.zeros(4, 2), torch.zeros(4, 2), mask,
                               torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([0, 0, 1, 1]), 0.0, finished)
        assert stats["truncated_masked"] == expect
        assert added.loss_mask[:, 0].tolist() == [1.0, 0.0 if on else 1.0, 1.0, 1.0]
        assert added.advantages[1, 0] != 0  # it still counts in its group's baseline


def test_rollout_correction_multiplies_the_decoupled_weight_and_masks_the_loss():
    # one response of 3 tokens: live (old) vs behaviour log-probs give the decoupled weights e^0, e^.5, e^1 -> cap 2:
    # [1, 1.6487, 2]; learner vs engine at the sampling weights give rho = [1, 3, .25]
    mask = torch.ones(1, 3)
    behaviour = torch.tensor([[-1.0, -1.5, -2.0]])
    old = behaviour + torch.tensor([[0.0, 0.5, 1.0]])
    engine = behaviour - torch.log(torch.tensor([[1.0, 3.0, 0.25]]))
    batch = _batch(mask, torch.tensor([1.0]), torch.tensor([0]), old, behaviour=behaviour, rollout=engine)
    decoupled = torch.exp(torch.tensor([[0.0, 0.5, 1.0]])).clamp(max=2.0)
    added, stats = advantages_and_weights(_ppo("estimator=reinforce_pp"), batch, 0.0)
    assert added.rollout_weights is None  # mode none: no correction factor at all
    assert stats["rollout_is_max"] == pytest.approx(3.0) and torch.equal(added.loss_mask, mask)
    # the loss weighs each token by the decoupled weight: ratio 1, A = -1 -> token loss 1 x weight, token mean
    ppo_cfg, adv = _ppo("estimator=reinforce_pp"), -torch.ones(1, 3)
    _, info = micro_batch_loss({"logprobs": old}, _rows(old, adv, mask, behaviour=behaviour), ppo_cfg, 0.0, 3, 1)
    assert info["policy_loss"].item() == pytest.approx(float(decoupled.mean()), rel=1e-6)
    assert info["behaviour_weight_mean"].item() == pytest.approx(float(decoupled.mean()), rel=1e-6)
    # TIS (cap 2): [1 * 1, 1.6487 * 2, 2 * .25]; the weights multiply (pi_old / pi_behaviour) * (pi_behaviour /
    # pi_engine), so the product telescopes to veRL's decoupled weight pi_old / pi_rollout, each part truncated
    ppo_cfg = _ppo("estimator=reinforce_pp", "rollout_correction.mode=tis")
    added, stats = advantages_and_weights(ppo_cfg, batch, 0.0)
    assert torch.allclose(added.rollout_weights, torch.tensor([[1.0, 2.0, 0.25]]))
    assert stats["rollout_is_clipped_frac"] == pytest.approx(1 / 3)
    rows = _rows(old, adv, mask, behaviour=behaviour, rollout_weights=added.rollout_weights)
    _, info = micro_batch_loss({"logprobs": old}, rows, ppo_cfg, 0.0, 3, 1)
    expect = float((decoupled * torch.tensor([[1.0, 2.0, 0.25]])).mean())
    assert info["policy_loss"].item() == pytest.approx(expect, rel=1e-6)
    # MIS (band [.5, 2]): tokens 2 and 3 leave the loss mask (and its token count)
    added, stats = advantages_and_weights(_ppo("estimator=reinforce_pp", "rollout_correction.mode=mis"), batch,
                                           0.0)
    assert torch.equal(added.loss_mask, torch.tensor([[1.0, 0.0, 0.0]]))
    assert stats["rollout_is_masked_frac"] == pytest.approx(2 / 3)


def test_proximal_log_probs_from_the_training_forward_equal_a_separate_pass():
    # stale samples (behaviour != live) and one optimizer step: old_logprobs None means the training forward's own
    # log-probs (detached) are the proximal ones. Same loss, same gradient as handing those values in; ratio 1, so the
    # clip never binds, and the decoupled weight is exp(live - behaviour) capped at 2.
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    behaviour = torch.tensor([[-1.0, -0.7, -2.0], [-0.3, -1.1, 0.0]])
    adv = torch.tensor([[0.5, 0.5, 0.5], [-1.0, -1.0, 0.0]])
    ppo_cfg = _ppo("estimator=grpo", "clip=0.01")
    grads, infos = [], []
    for fused in (True, False):
        live = torch.tensor([[-0.8, -0.9, -1.2], [-0.4, -0.2, -5.0]], requires_grad=True)
        old = None if fused else live.detach().clone()
        loss, info = micro_batch_loss({"logprobs": live}, _rows(live.detach(), adv, mask, behaviour=behaviour,
                                                                old=old), ppo_cfg, 0.0, 5, 2)
        loss.backward()
        grads.append(live.grad)
        infos.append(info)
    assert torch.equal(grads[0], grads[1]) and infos[0]["policy_loss"] == infos[1]["policy_loss"]
    weights = torch.exp(torch.tensor([[0.2, -0.2, 0.8], [-0.1, 0.9, 0.0]])).clamp(max=2.0)
    assert torch.allclose(grads[0], -adv * weights * mask / 5)  # d(-A w r)/d logp = -A w, token mean over 5
    assert infos[0]["clip_frac"].item() == 0.0


def test_the_proximal_pass_is_skipped_only_for_one_optimizer_step_without_a_critic():
    from medrl.ppo.algos import proximal_pass_needed

    one_step = ("minibatch_size=16", "prompts_per_step=4", "samples_per_prompt=4")
    assert not proximal_pass_needed(16, _ppo("estimator=grpo", *one_step))
    assert not proximal_pass_needed(12, _ppo("estimator=grpo", *one_step))  # rows filtered out: still one step
    assert proximal_pass_needed(32, _ppo("estimator=grpo", *one_step))  # two minibatches
    assert proximal_pass_needed(16, _ppo("estimator=grpo", "ppo_epochs=2", *one_step))
    assert proximal_pass_needed(16, _ppo("estimator=gae", *one_step))  # values come from that pass


def test_per_engine_and_per_loss_defaults():
    assert _ppo().rollout_correction.mode == "none" and _ppo("rollout.engine=vllm").rollout_correction.mode == "tis"
    assert _ppo("rollout.engine=vllm", "rollout_correction.mode=none").rollout_correction.mode == "none"
    assert _ppo().loss_agg_mode == "token-mean" and _ppo("policy_loss=gspo").loss_agg_mode == "seq-mean-token-mean"
    assert _ppo("policy_loss=gspo", "loss_agg_mode=token-mean").loss_agg_mode == "token-mean"


def test_rows_to_learn_counts_and_filters_zero_spread_groups():
    # groups: 0 -> [1, 1] (flat), 1 -> [0, 1], 2 -> [.3, .3] with one dropped row (still flat), 3 -> [0, 0] flat
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3, 0.3, 0.0, 0.0])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    dropped = torch.tensor([False] * 5 + [True] + [False] * 2)
    # the row's position in its token fields, to tell which rows are kept
    batch = _batch(torch.ones(8, 1), scores, group, torch.arange(8.0)[:, None], dropped=dropped)
    kept, stats = rows_to_learn(batch, _ppo(), ranks=1)
    assert kept.old_logprobs[:, 0].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert kept.group.tolist() == [0, 0, 1, 1, 2, 3, 3] and kept.scores.tolist() == scores[[0, 1, 2, 3, 4, 6, 7]].tolist()
    assert stats == {"zero_spread_groups": 3, "zero_spread_frac": 0.75}
    kept, _ = rows_to_learn(batch, _ppo("filter_zero_spread_groups=true"), ranks=1)
    assert kept.old_logprobs[:, 0].tolist() == [2, 3]
    kept, _ = rows_to_learn(batch, _ppo(), ranks=2)
    assert kept.old_logprobs[:, 0].tolist() == [0, 1, 2, 3, 4, 6]  # equal shards
    kept, _ = rows_to_learn(batch.replace(dropped=torch.zeros(8, dtype=torch.bool)), _ppo(), ranks=2)
    assert len(kept) == 8
    kept, _ = rows_to_learn(batch.replace(scores=torch.zeros(8)), _ppo("filter_zero_spread_groups=true"), ranks=1)
    assert len(kept) == 0  # nothing to learn: the update is skipped


def test_a_zero_kl_coefficient_skips_the_reference_forward(tiny_model_dir):
    """The reference pass is a second forward over the batch with the adapter disabled: counted on the real model."""
    from medrl.models.loading import load_policy
    from medrl.ppo.modeling import PolicyWithValue, old_and_ref_logprobs

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.device=cpu", "model.dtype=float32"])
    policy = load_policy(cfg.model, None, trainable=True, device="cpu")
    calls = []
    policy.get_base_model().model.register_forward_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(0)
    batch = Batch.pack([Sample(0, i, torch.randint(10, 500, (4,), generator=gen).tolist(),
                               torch.randint(10, 500, (3,), generator=gen).tolist(), "", True) for i in range(2)], 0)
    for with_reference, forwards in ((True, 2), (False, 1)):
        calls.clear()
        out = old_and_ref_logprobs(PolicyWithValue(policy), policy, batch, 2, 1.0, with_values=False,
                                   with_reference=with_reference)
        assert len(calls) == forwards and ("ref_logprobs" in out) == with_reference


@pytest.mark.slow
def test_learner_skips_a_nonfinite_minibatch_and_keeps_learning(tiny_model_dir, tmp_path, ray_local):
    """One plain-PyTorch learner rank (a Ray actor): a NaN advantage makes that minibatch's loss non-finite; the
    update is skipped (weights and LR schedule untouched), counted, and the next clean batch trains normally."""
    import ray

    from medrl.ppo.learner import Learner
    from ppo_setup import ppo_config, weights_digests

    cfg, _ = ppo_config(tmp_path, tiny_model_dir, "guard", "ppo.micro_batch_size=2", "ppo.minibatch_size=4",
                        "ppo.lr_scheduler=linear", "ppo.kl.placement=loss", "ppo.kl.estimator=k3")
    learner = ray.remote(Learner).options(num_cpus=0.5).remote(cfg, 0, 1, None, None)
    ray.get(learner.setup.remote("127.0.0.1", 0, 0))  # one rank: no rendezvous
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(i // 2, i % 2, torch.randint(10, 500, (5,), generator=gen).tolist(),
                      torch.randint(10, 500, (4,), generator=gen).tolist(), "", True) for i in range(4)]
    batch = Batch.pack(samples, 0).for_learner()
    batch = batch.replace(**ray.get(learner.make_experience.remote(batch)))
    assert batch.ref_logprobs is not None  # kl.init_coef > 0: the reference forward runs
    batch, _ = advantages_and_weights(cfg.ppo, batch.replace(scores=torch.tensor([0.0, 1.0, 1.0, 0.5])), 0.01)
    nan_advantages = batch.advantages.clone()
    nan_advantages[3, 1] = float("nan")
    poisoned = batch.replace(advantages=nan_advantages)
    before = weights_digests(learner)[0]
    bad = ray.get(learner.train.remote(poisoned, 1, 0, 0.01))
    assert bad["nonfinite_skipped"] == 1 and weights_digests(learner)[0] == before
    assert bad["lr"] == cfg.ppo.lr  # the linear schedule did not move
    good = ray.get(learner.train.remote(batch, 1, 0, 0.01))
    assert good["nonfinite_skipped"] == 0 and math.isfinite(good["policy_loss"]) and good["kl_loss"] >= 0
    assert good["lr"] < cfg.ppo.lr and weights_digests(learner)[0] != before
    ray.kill(learner)


@pytest.mark.slow
def test_stale_samples_with_one_update_skip_the_proximal_pass(tiny_model_dir, tmp_path, ray_local):
    """A real learner rank with async_rollout: samples drawn by version 0 scored after an update (version 1 live).
    Asked for no proximal pass, it returns the same behaviour and reference log-probs without the live weights'
    (one forward fewer); training on that batch takes the proximal log-probs from its own forward, so nothing clips
    and the decoupled weights are those of the separate pass."""
    import ray

    from medrl.ppo.algos import proximal_pass_needed
    from medrl.ppo.learner import Learner
    from ppo_setup import ppo_config

    cfg, _ = ppo_config(tmp_path, tiny_model_dir, "fused", "ppo.async_rollout=true", "ppo.estimator=grpo",
                        "ppo.minibatch_size=4", "ppo.micro_batch_size=4", "ppo.lr=0.05", "ppo.clip=0.01",
                        "ppo.prompts_per_step=2", "ppo.samples_per_prompt=2")
    assert not proximal_pass_needed(4, cfg.ppo) and proximal_pass_needed(8, cfg.ppo)  # 2 minibatches of 4
    learner = ray.remote(Learner).options(num_cpus=0.5).remote(cfg, 0, 1, None, None)
    ray.get(learner.setup.remote("127.0.0.1", 0, 0))
    gen = torch.Generator().manual_seed(5)
    batch = Batch.pack([Sample(i // 2, i % 2, torch.randint(10, 500, (5,), generator=gen).tolist(),
                               torch.randint(10, 500, (4,), generator=gen).tolist(), "", True)
                        for i in range(4)], 0).for_learner()
    scores = torch.tensor([0.0, 1.0, 1.0, 0.2])
    ray.get(learner.adapter_state.remote(0))  # version 0 published (and kept: the samples' weights)
    first = batch.replace(**ray.get(learner.make_experience.remote(batch, 0, False)))  # live = 0: a full pass
    assert first.old_logprobs is not None and torch.equal(first.old_logprobs, first.behaviour_logprobs)
    first, _ = advantages_and_weights(cfg.ppo, first.replace(scores=scores), 0.01)
    ray.get(learner.train.remote(first, 1, 0, 0.01))
    ray.get(learner.adapter_state.remote(1))  # the update, published as version 1
    full = ray.get(learner.make_experience.remote(batch, 0, True))
    fused = ray.get(learner.make_experience.remote(batch, 0, False))
    assert set(full) == {"old_logprobs", "behaviour_logprobs", "ref_logprobs"}
    assert set(fused) == {"behaviour_logprobs", "ref_logprobs"}
    assert torch.equal(fused["behaviour_logprobs"], full["behaviour_logprobs"])
    assert torch.equal(fused["ref_logprobs"], full["ref_logprobs"])
    mask = batch.response_mask
    assert float(((full["old_logprobs"] - full["behaviour_logprobs"]).abs() * mask).max()) > 1e-4  # stale
    expected_weight = float(masked_mean(torch.exp(full["old_logprobs"] - full["behaviour_logprobs"]).clamp(max=2.0),
                                        mask))
    fused_batch, _ = advantages_and_weights(cfg.ppo, batch.replace(**fused, scores=scores), 0.01)
    metrics = ray.get(learner.train.remote(fused_batch, 1, 1, 0.01))
    assert metrics["clip_frac"] == 0.0 and metrics["approx_kl"] == 0.0  # ratio exactly 1
    assert metrics["behaviour_weight_mean"] == pytest.approx(expected_weight, rel=1e-5)
    ray.kill(learner)
