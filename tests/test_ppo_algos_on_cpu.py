"""RL math against values worked out by hand (comments show the arithmetic)."""
import math

import pytest
import torch

from medrl.ppo import algos, objective
from medrl.ppo.kl_controller import AdaptiveKLController, FixedKLController, make_kl_controller
from medrl.ppo.config import KLSettings, RolloutCorrectionSettings


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_gae_by_hand_with_padding():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = t([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = algos.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: d2 = 1 - .7 = .3 -> A2 = .3; d1 = .9*.7 - .6 = .03 -> A1 = .03 + .45*.3 = .165;
    #        d0 = .9*.6 - .5 = .04 -> A0 = .04 + .45*.165 = .11425
    # row 1 (last token padding, its reward 5 and value 9 ignored): d1 = 2 - 1 = 1 -> A1 = 1;
    #        d0 = .9*1 - 1 = -.1 -> A0 = -.1 + .45*1 = .35
    assert torch.allclose(adv, t([[0.11425, 0.165, 0.3], [0.35, 1.0, 0.0]]))
    assert torch.allclose(ret, t([[0.61425, 0.765, 1.0], [1.35, 2.0, 0.0]]))
    # gamma = lam = 1 and V = 0: advantages are the plain reward-to-go
    adv1, _ = algos.gae(rewards, torch.zeros_like(values), mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv1, algos.discounted_returns(rewards, mask, 1.0))


def test_discounted_returns_and_whitening():
    # G2 = 2, G1 = 0 + .5*2 = 1, G0 = 1 + .5*1 = 1.5
    assert torch.allclose(algos.discounted_returns(t([[1.0, 0.0, 2.0]]), t([[1, 1, 1]]), 0.5), t([[1.5, 1.0, 2.0]]))
    x, mask = t([[1.0, 2.0], [3.0, 100.0]]), t([[1, 1], [1, 0]])
    # mean 2, unbiased var ((1) + 0 + (1)) / 2 = 1 -> [-1, 0, 1]; the padded 100 is ignored and zeroed
    assert torch.allclose(algos.masked_whiten(x, mask), t([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6)
    # shift_mean=False keeps the mean: [-1, 0, 1] + 2
    assert torch.allclose(algos.masked_whiten(x, mask, shift_mean=False), t([[1.0, 2.0], [3.0, 0.0]]), atol=1e-6)
    assert algos.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert torch.allclose(algos.masked_mean(x, mask, dim=1), t([1.5, 3.0]))


def _ppo_loss(logp, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=None, weights=None, name="ppo"):
    token, info = objective.policy_loss(name, logp, torch.zeros_like(logp), adv, mask, clip_low=clip_low,
                                    clip_high=clip_high, dual_clip=dual_clip, behaviour_weights=weights)
    return objective.aggregate_loss(token, mask, "token-mean", n_tokens=mask.sum(), n_seqs=1, norm_len=1), info


def test_clipped_policy_loss_by_hand():
    ratio = t([[1.5, 0.5, 1.0, 0.5, 7.0]])
    adv = t([[1.0, -1.0, 2.0, 1.0, 50.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, info = _ppo_loss(torch.log(ratio), adv, mask)
    # token terms max(-A r, -A clip(r)): 1.5,A=1 -> max(-1.5,-1.2) = -1.2 (clipped); .5,A=-1 -> max(.5,.8) = .8
    # (clipped); 1,A=2 -> -2; .5,A=1 -> max(-.5,-.8) = -.5 (not clipped). Mean = (-1.2+.8-2-.5)/4 = -.725
    assert loss.item() == pytest.approx(-0.725)
    assert info["clip_frac"].item() == pytest.approx(0.5)
    # approx KL = mean(.5 log(r)^2) over the 4 real tokens
    expect = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    assert info["approx_kl"].item() == pytest.approx(expect)
    # the gradient only flows through unclipped tokens: d/dlogp of -A r at r=1 (token 3) and r=.5 (token 4)
    logp = torch.log(ratio).clone().requires_grad_(True)
    _ppo_loss(logp, adv, mask)[0].backward()
    assert torch.allclose(logp.grad, t([[0.0, 0.0, -2.0 / 4, -0.5 / 4, 0.0]]))
    with pytest.raises(ValueError, match="unknown policy loss 'trpo'"):
        _ppo_loss(logp, adv, mask, name="trpo")


def test_clip_higher_and_dual_clip_by_hand():
    # clip_low .2, clip_high .28 (DAPO): r = 1.25, A = 1 is inside [.8, 1.28] -> -1.25 (symmetric .2: -1.2);
    # r = 1.5, A = 1 -> -1.28; r = .7, A = -1 -> max(.7, .8) = .8
    logp, adv, mask = torch.log(t([[1.25, 1.5, 0.7]])), t([[1.0, 1.0, -1.0]]), t([[1, 1, 1]])
    token, info = objective.policy_loss("ppo", logp, torch.zeros_like(logp), adv, mask, clip_low=0.2, clip_high=0.28)
    assert torch.allclose(token, t([[-1.25, -1.28, 0.8]]))
    assert info["clip_frac"].item() == pytest.approx(2 / 3)
    # dual clip c = 3 caps the loss of negative-advantage tokens at -A c: r = 5, A = -2 -> max(10, 2.4) = 10 -> 6;
    # r = 2, A = -1 -> 2 (< 3, kept); r = 5, A = +1 -> -1.2 (positive advantages are never dual-clipped)
    logp, adv = torch.log(t([[5.0, 2.0, 5.0]])), t([[-2.0, -1.0, 1.0]])
    token, info = objective.policy_loss("ppo", logp, torch.zeros_like(logp), adv, mask, clip_low=0.2, clip_high=0.2,
                                    dual_clip=3.0)
    assert torch.allclose(token, t([[6.0, 2.0, -1.2]]))
    assert info["dual_clip_frac"].item() == pytest.approx(1 / 3)


def test_gspo_uses_one_ratio_per_response():
    # row log-ratios [.1, .3] -> mean .2 -> s = e^.2 = 1.2214 for both tokens; A = 1: max(-1.2214, -1.2) = -1.2
    # (clipped, no gradient). Row 2: [-.05, .05] -> s = 1, -A s = -2 on both tokens; d/dlogp_t = -2 (s = 1)
    logp = t([[0.1, 0.3], [-0.05, 0.05]]).requires_grad_(True)
    adv, mask = t([[1.0, 1.0], [2.0, 2.0]]), t([[1, 1], [1, 1]])
    token, info = objective.policy_loss("gspo", logp, torch.zeros_like(logp), adv, mask, clip_low=0.2, clip_high=0.2)
    assert torch.allclose(token, t([[-1.2, -1.2], [-2.0, -2.0]]))
    token.sum().backward()
    assert torch.allclose(logp.grad, t([[0.0, 0.0], [-2.0, -2.0]]))


def test_loss_aggregation_modes_by_hand_and_across_micro_batches():
    # row 0: one token of loss 4; row 1: three tokens 1, 2, 3; row 2: empty
    loss = t([[4.0, 0.0, 0.0], [1.0, 2.0, 3.0], [9.0, 9.0, 9.0]])
    mask = t([[1, 0, 0], [1, 1, 1], [0, 0, 0]])
    kw = dict(n_tokens=4, n_seqs=2, norm_len=8)
    # token-mean (4 + 6) / 4 = 2.5; seq-mean-token-mean (4 + 2) / 2 = 3; sum-norm (4 + 6) / (2 * 8) = .625
    expect = {"token-mean": 2.5, "seq-mean-token-mean": 3.0, "seq-mean-token-sum-norm": 0.625}
    for mode, value in expect.items():
        assert objective.aggregate_loss(loss, mask, mode, **kw).item() == pytest.approx(value)
        # one row per micro-batch, the minibatch totals as denominators: the parts add up to the whole
        parts = sum(objective.aggregate_loss(loss[i:i + 1], mask[i:i + 1], mode, **kw) for i in range(3))
        assert parts.item() == pytest.approx(value)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        objective.aggregate_loss(loss, mask, "sum", **kw)


def test_log_ratio_and_kl_clamps_keep_the_loss_finite():
    # fp32: a log-ratio of 95 overflows exp (e^95 = inf): with A < 0 the loss -A r was inf and its gradient NaN.
    # Clamped at +-20: A = 1 -> max(-e^20, -1.2) = -1.2; r = e^-20, A = -1 -> max(~0, .8) = .8
    logp = torch.tensor([[95.0, -95.0]], requires_grad=True)
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    token, _ = objective.policy_loss("ppo", logp, torch.zeros_like(logp), adv, mask, clip_low=0.2, clip_high=0.2)
    assert torch.isfinite(token).all() and torch.allclose(token, torch.tensor([[-1.2, 0.8]]))
    token, _ = objective.policy_loss("ppo", logp, torch.zeros_like(logp), -adv, mask, clip_low=0.2, clip_high=0.2)
    token.sum().backward()
    assert torch.isfinite(token).all() and token[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-5)
    assert torch.isfinite(logp.grad).all()
    # k3 at a log-ratio of -100: exp(100) - 101 = inf in fp32 -> clamped to 10; k1 likewise to -10 / +10
    lp, ref = torch.tensor([-100.0, 0.0, 30.0]), torch.tensor([0.0, 0.0, 0.0])
    assert torch.equal(algos.kl_estimate(lp, ref, "k3"), torch.tensor([10.0, 0.0, 10.0]))
    assert torch.equal(algos.kl_estimate(lp, ref, "k1"), torch.tensor([-10.0, 0.0, 10.0]))


def test_behaviour_weights_and_decoupled_loss_by_hand():
    # pi_old / pi_behaviour = exp(old - behaviour): 1, e^-1 = .3679, e^1 = 2.718 -> truncated at 2
    old, behaviour = t([[0.0, -1.0, 0.0]]), t([[0.0, 0.0, -1.0]])
    w = algos.behaviour_weights(old, behaviour, cap=2.0)
    assert torch.allclose(w, t([[1.0, math.exp(-1.0), 2.0]]))
    # each token's surrogate is scaled by its weight: ratios 1.5 (A=1, clipped -> -1.2), 1 (A=2 -> -2), .5 (A=1 ->
    # -.5): (1 * -1.2 + .3679 * -2 + 2 * -.5) / 3
    ratio, adv, mask = t([[1.5, 1.0, 0.5]]), t([[1.0, 2.0, 1.0]]), t([[1, 1, 1]])
    loss, _ = _ppo_loss(torch.log(ratio), adv, mask, weights=w)
    assert loss.item() == pytest.approx((-1.2 - 2 * math.exp(-1.0) - 1.0) / 3)
    unweighted, _ = _ppo_loss(torch.log(ratio), adv, mask, weights=torch.ones_like(w))
    assert unweighted.item() == pytest.approx(_ppo_loss(torch.log(ratio), adv, mask)[0].item())


def _correction(mode, level="token", **bounds):
    """rho = pi_learner / pi_engine per token: row 0 [1.5, .25, 1], row 1 [4, 1, padding], row 2 empty."""
    engine = t([[-1.0, -2.0, -0.5], [-3.0, -0.1, -7.0], [0.0, 0.0, 0.0]])
    learner = engine + t([[math.log(1.5), math.log(0.25), 0.0], [math.log(4.0), 0.0, 5.0], [0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    settings = RolloutCorrectionSettings(mode=mode, level=level, **bounds)
    return algos.rollout_correction(learner, engine, mask, settings), mask


def test_rollout_correction_token_level_by_hand():
    (weights, keep, stats), mask = _correction("none")
    # k3 of KL(engine || learner) from the engine's samples: rho - 1 - ln rho per token, mean over the 5 tokens:
    # 1.5 -> .5 - .405465 = .094535; .25 -> -.75 + 1.386294 = .636294; 4 -> 3 - 1.386294 = 1.613706; 1 -> 0 (x2)
    assert stats["rollout_kl"] == pytest.approx((0.094535 + 0.636294 + 1.613706) / 5, rel=1e-5)
    # mean of rho over the 5 tokens (7.75 / 5), its max 4; the padded log-ratio 5 (rho 148) is not looked at
    assert (stats["rollout_is_mean"], stats["rollout_is_max"]) == (pytest.approx(1.55), pytest.approx(4.0))
    assert torch.equal(weights, torch.ones_like(mask)) and torch.equal(keep, torch.ones_like(mask))
    assert "rollout_is_clipped_frac" not in stats and "rollout_is_masked_frac" not in stats
    # TIS: min(rho, 2). veRL's compute_rollout_correction_weights(rollout_is="token", rollout_is_threshold=2.0)
    # is exp(clamp(old_log_prob - rollout_log_prob, +-20)) truncated at the threshold, and TRL's
    # vllm_importance_sampling_mode="token_truncate" is min(exp(old_per_token_logps - sampling_per_token_logps),
    # vllm_importance_sampling_cap): the same numbers, their old log-prob being our learner's behaviour log-prob.
    (weights, keep, stats), _ = _correction("tis", cap=2.0)
    assert torch.allclose(weights, t([[1.5, 0.25, 1.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(keep, torch.ones_like(mask)) and stats["rollout_is_clipped_frac"] == pytest.approx(1 / 5)
    # MIS, band [.5, 2]: .25 and 4 leave the loss (keep 0), the others keep their weight rho (2 of 5 masked).
    # TRL's "token_mask" zeroes rho above vllm_importance_sampling_cap only (no lower bound) and leaves the token in
    # the loss's denominator; veRL's rejection sampling (rollout_rs, the IcePop band) removes it from the
    # response mask, as here.
    (weights, keep, stats), _ = _correction("mis", low=0.5, high=2.0)
    assert torch.allclose(weights, t([[1.5, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(keep * mask, t([[1, 0, 1], [0, 1, 0], [0, 0, 0]]))
    assert stats["rollout_is_masked_frac"] == pytest.approx(2 / 5)


def test_rollout_correction_sequence_level_is_the_geometric_mean():
    # row 0: (1.5 * .25 * 1)^(1/3) = .375^(1/3) = .721125; row 1: (4 * 1)^(1/2) = 2; the empty row is no unit.
    # veRL's rollout_is="sequence" and TRL's "sequence_*" modes use the product exp(sum log rho) instead: .375 and
    # 4 here, a weight that shrinks or explodes with the response length, hence the geometric mean (as GSPO's ratio).
    g0 = 0.375 ** (1 / 3)
    (weights, _, stats), mask = _correction("tis", "sequence", cap=1.5)
    assert torch.allclose(weights, t([[g0, g0, g0], [1.5, 1.5, 0.0], [0.0, 0.0, 0.0]]))
    assert stats["rollout_is_mean"] == pytest.approx((g0 + 2.0) / 2) and stats["rollout_is_max"] == pytest.approx(2.0)
    assert stats["rollout_is_clipped_frac"] == pytest.approx(1 / 2)
    # MIS, band [.5, 1.9]: row 1 (2) leaves the loss whole; row 0 keeps all its tokens at weight .721
    (weights, keep, stats), _ = _correction("mis", "sequence", low=0.5, high=1.9)
    assert torch.equal(keep * mask, t([[1, 1, 1], [0, 0, 0], [0, 0, 0]]))
    assert torch.allclose(weights, t([[g0, g0, g0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert stats["rollout_is_masked_frac"] == pytest.approx(1 / 2)


def test_clipped_value_loss_by_hand():
    values, old, returns, mask = t([[1.0, 2.0, 5.0]]), t([[0.5, 2.0, 0.0]]), t([[2.0, 0.0, 0.0]]), t([[1, 1, 0]])
    # token 0: unclipped (1-2)^2 = 1, clipped value .5+.2 = .7 -> (.7-2)^2 = 1.69 -> 1.69; token 1: 4 and 4
    loss, info = objective.value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 4.0) / 2)
    assert info["value_clip_frac"].item() == pytest.approx(0.5)
    loss_unclipped, _ = objective.value_loss(values, old, returns, mask, clip=None)
    assert loss_unclipped.item() == pytest.approx(0.5 * (1.0 + 4.0) / 2)


def test_kl_estimators_by_hand_and_unbiased():
    log_ratio = t([0.5, -1.0])
    assert torch.allclose(algos.kl_estimate(log_ratio, torch.zeros(2, dtype=torch.float64), "k1"), t([0.5, -1.0]))
    assert torch.allclose(algos.kl_estimate(log_ratio, torch.zeros(2, dtype=torch.float64), "k2"), t([0.125, 0.5]))
    # k3 = exp(-r) - 1 + r: r=.5 -> .60653066 - .5; r=-1 -> e - 2
    assert torch.allclose(algos.kl_estimate(log_ratio, torch.zeros(2, dtype=torch.float64), "k3"),
                          t([math.exp(-0.5) - 0.5, math.e - 2.0]))
    # E_p[k1] = E_p[k3] = KL(p||q) exactly; k2 is a (close) second-order approximation
    p, q = t([0.1, 0.2, 0.3, 0.4]), t([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        assert (p * algos.kl_estimate(p.log(), q.log(), kind)).sum().item() == pytest.approx(exact.item())
    assert (p * algos.kl_estimate(p.log(), q.log(), "k2")).sum().item() == pytest.approx(exact.item(), rel=0.1)
    with pytest.raises(ValueError, match="k4"):
        algos.kl_estimate(log_ratio, log_ratio, "k4")


def test_entropy_and_token_rewards():
    # uniform over 2 -> ln 2; softmax([0, ln 3]) = [.25, .75] -> -(.25 ln .25 + .75 ln .75)
    ent = objective.entropy_from_logits(t([[0.0, 0.0], [0.0, math.log(3.0)]]))
    assert torch.allclose(ent, t([math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]))
    rewards = algos.token_rewards(t([1.0, 2.0]), t([[0.1, 0.2, 0.3], [0.1, 0.1, 9.0]]), t([[1, 1, 1], [1, 1, 0]]))
    assert torch.allclose(rewards, t([[-0.1, -0.2, 0.7], [-0.1, 1.9, 0.0]]))


def test_grpo_rloo_reinforce_pp_by_hand():
    scores = t([1.0, 2.0, 3.0, 5.0, 5.0, 7.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    mask = torch.ones(6, 2, dtype=torch.float64)
    kl_penalty = torch.zeros(6, 2, dtype=torch.float64)
    kl_penalty[0] = t([0.1, 0.2])
    kw = dict(scores=scores, kl_penalty=kl_penalty, mask=mask, group=group)
    adv, _ = algos.compute_advantages("grpo", **kw)
    # group 0: mean 2, unbiased std 1 -> [-1, 0, 1]; group 1: equal scores -> 0; group 2 has one sample -> 0.
    # Row 0 also pays its KL: token rewards [-.1, -1 - .2] -> reward-to-go [-1.3, -1.2]
    expect = t([[-1.3, -1.2], [0, 0], [1, 1], [0, 0], [0, 0], [0, 0]])
    assert torch.allclose(adv, expect, atol=1e-5)
    adv, _ = algos.compute_advantages("rloo", **kw)
    # leave-one-out baselines in group 0: (2+3)/2 = 2.5, (1+3)/2 = 2, (1+2)/2 = 1.5 -> -1.5, 0, 1.5
    expect = t([[-1.5 - 0.3, -1.5 - 0.2], [0, 0], [1.5, 1.5], [0, 0], [0, 0], [0, 0]])
    assert torch.allclose(adv, expect, atol=1e-6)
    adv, ret = algos.compute_advantages("reinforce_pp", scores=t([1.0, 3.0]), kl_penalty=torch.zeros(2, 2,
                                        dtype=torch.float64), mask=t([[1, 1], [1, 0]]), group=torch.tensor([0, 1]))
    # returns [[1, 1], [3, pad]]; whiten over {1, 1, 3}: mean 5/3, unbiased var ((2/3)^2*2 + (4/3)^2)/2 = 4/3
    sd = math.sqrt(4 / 3)
    assert torch.allclose(ret, t([[1.0, 1.0], [3.0, 0.0]]))
    assert torch.allclose(adv, t([[-2 / 3 / sd, -2 / 3 / sd], [4 / 3 / sd, 0.0]]), atol=1e-6)


def test_dr_grpo_subtracts_the_group_mean_only():
    scores, group = t([1.0, 2.0, 6.0, 4.0, 4.0]), torch.tensor([0, 0, 0, 1, 1])
    kw = dict(scores=scores, kl_penalty=torch.zeros(5, 1, dtype=torch.float64), mask=torch.ones(5, 1,
              dtype=torch.float64), group=group)
    adv, _ = algos.compute_advantages("dr_grpo", **kw)
    # group 0: mean 3 -> [-2, -1, 3] (grpo would divide by the std, sqrt(7)); group 1: equal scores -> 0
    assert torch.equal(adv[:, 0], t([-2.0, -1.0, 3.0, 0.0, 0.0]))
    grpo, _ = algos.compute_advantages("grpo", **kw)
    assert torch.allclose(grpo[:3, 0], t([-2.0, -1.0, 3.0]) / (math.sqrt(7.0) + 1e-6))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_groups_get_exactly_zero_advantage_in_fp32(estimator):
    """The old fp32 group mean of 8 x 0.97 landed one ulp off, its std ~1e-7 < eps, and every row got -0.106."""
    values = torch.linspace(0, 1, 101).tolist() + [2.7, -3.1, 1e3, 1e-7]
    for n in range(2, 17):
        scores = torch.tensor([v for v in values for _ in range(n)], dtype=torch.float32)
        group = torch.arange(len(values)).repeat_interleave(n)
        mask = torch.ones(len(scores), 3)
        adv, _ = algos.compute_advantages(estimator, scores=scores, kl_penalty=torch.zeros_like(mask), mask=mask,
                                          group=group)
        assert adv.dtype == torch.float32 and torch.count_nonzero(adv) == 0, (n, adv.abs().max())
    # a group with spread next to equal groups still gets its signal: [0.97, 0.97, 0.99] -> -1/sqrt(3) x 2, 2/sqrt(3)
    scores = torch.tensor([0.97, 0.97, 0.99, 0.5, 0.5, 0.5])
    st = algos.group_stats(scores, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert st.zero_spread.tolist() == [False] * 3 + [True] * 3 and st.mean.dtype == torch.float64
    if estimator == "grpo":
        adv, _ = algos.compute_advantages("grpo", scores=scores, kl_penalty=torch.zeros(6, 1), mask=torch.ones(6, 1),
                                          group=torch.tensor([0, 0, 0, 1, 1, 1]))
        assert adv[:, 0].tolist() == pytest.approx([-1 / math.sqrt(3)] * 2 + [2 / math.sqrt(3)] + [0.0] * 3,
                                                   rel=1e-4)


def test_gae_estimator_uses_values_and_whitens():
    scores, mask = t([1.0, 0.0]), t([[1, 1], [1, 1]])
    values = t([[0.5, 0.5], [0.0, 0.5]])
    kw = dict(scores=scores, kl_penalty=torch.zeros(2, 2, dtype=torch.float64), mask=mask,
              group=torch.tensor([0, 1]), values=values, gamma=1.0, lam=1.0)
    adv, ret = algos.compute_advantages("gae", whiten=False, **kw)
    # gamma = lam = 1: A_t = G_t - V_t with G = score on every token: [[.5, .5], [0, -.5]]
    assert torch.allclose(adv, t([[0.5, 0.5], [0.0, -0.5]]))
    assert torch.allclose(ret, t([[1.0, 1.0], [0.0, 0.0]]))
    white, _ = algos.compute_advantages("gae", whiten=True, **kw)
    assert white.mean().item() == pytest.approx(0.0, abs=1e-7) and white.std().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="value head"):
        algos.compute_advantages("gae", **{**kw, "values": None})
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo2'"):
        algos.compute_advantages("ppo2", **kw)


def test_kl_controllers():
    ctl = AdaptiveKLController(0.1, target=0.1, horizon=100)
    # KL 2x target: error clipped to +.2 -> .1 * (1 + .2 * 10/100) = .102
    assert ctl.update(0.2, 10) == pytest.approx(0.102)
    # KL .09: error -.1 -> .102 * (1 - .1 * 10/100) = .10098
    assert ctl.update(0.09, 10) == pytest.approx(0.10098)
    other = make_kl_controller(KLSettings(mode="adaptive", init_coef=1.0, target=0.1, horizon=100))
    other.load_state_dict(ctl.state_dict())
    assert other.update(0.2, 10) == pytest.approx(0.10098 * 1.02)
    fixed = make_kl_controller(KLSettings(mode="fixed", init_coef=0.3))
    assert isinstance(fixed, FixedKLController) and fixed.update(5.0, 100) == 0.3


def test_config_choices_and_registries_name_the_same_estimators_and_losses():
    import typing

    from medrl.ppo.config import EstimatorName, PolicyLossName, check_registry
    from medrl.ppo.objective import POLICY_LOSSES

    assert set(typing.get_args(EstimatorName)) == set(algos.ADVANTAGE_ESTIMATORS)
    assert set(typing.get_args(PolicyLossName)) == set(POLICY_LOSSES)
    check_registry(algos.ADVANTAGE_ESTIMATORS, EstimatorName, "ppo.estimator")
    extra = {**algos.ADVANTAGE_ESTIMATORS, "vapo": None}  # code registered under a name the config does not offer
    with pytest.raises(RuntimeError, match=r"ppo.estimator: the config offers .* registry has .*'vapo'"):
        check_registry(extra, EstimatorName, "ppo.estimator")
    with pytest.raises(RuntimeError, match="ppo.policy_loss"):
        check_registry({"ppo": None}, PolicyLossName, "ppo.policy_loss")  # a config choice with no code
