"""RL math against values worked out by hand (comments show the arithmetic)."""
import math

import pytest
import torch

from medrl.ppo import algos
from medrl.ppo.kl_controller import AdaptiveKLController, FixedKLController, make_kl_controller
from medrl.ppo.config import KLSettings


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


def test_clipped_policy_loss_by_hand():
    ratio = t([[1.5, 0.5, 1.0, 0.5, 7.0]])
    adv = t([[1.0, -1.0, 2.0, 1.0, 50.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, info = algos.policy_loss(torch.log(ratio), torch.zeros_like(ratio), adv, mask, clip=0.2)
    # token terms max(-A r, -A clip(r)): 1.5,A=1 -> max(-1.5,-1.2) = -1.2 (clipped); .5,A=-1 -> max(.5,.8) = .8
    # (clipped); 1,A=2 -> -2; .5,A=1 -> max(-.5,-.8) = -.5 (not clipped). Mean = (-1.2+.8-2-.5)/4 = -.725
    assert loss.item() == pytest.approx(-0.725)
    assert info["clip_frac"].item() == pytest.approx(0.5)
    # approx KL = mean(.5 log(r)^2) over the 4 real tokens
    expect = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    assert info["approx_kl"].item() == pytest.approx(expect)
    # the gradient only flows through unclipped tokens: d/dlogp of -A r at r=1 (token 3) and r=.5 (token 4)
    logp = torch.log(ratio).clone().requires_grad_(True)
    algos.policy_loss(logp, torch.zeros_like(ratio), adv, mask, clip=0.2)[0].backward()
    assert torch.allclose(logp.grad, t([[0.0, 0.0, -2.0 / 4, -0.5 / 4, 0.0]]))


def test_behaviour_weights_and_decoupled_loss_by_hand():
    # pi_old / pi_behaviour = exp(old - behaviour): 1, e^-1 = .3679, e^1 = 2.718 -> truncated at 2
    old, behaviour = t([[0.0, -1.0, 0.0]]), t([[0.0, 0.0, -1.0]])
    w = algos.behaviour_weights(old, behaviour, cap=2.0)
    assert torch.allclose(w, t([[1.0, math.exp(-1.0), 2.0]]))
    # each token's surrogate is scaled by its weight: ratios 1.5 (A=1, clipped -> -1.2), 1 (A=2 -> -2), .5 (A=1 ->
    # -.5): (1 * -1.2 + .3679 * -2 + 2 * -.5) / 3
    ratio, adv, mask = t([[1.5, 1.0, 0.5]]), t([[1.0, 2.0, 1.0]]), t([[1, 1, 1]])
    loss, _ = algos.policy_loss(torch.log(ratio), torch.zeros_like(ratio), adv, mask, 0.2, w)
    assert loss.item() == pytest.approx((-1.2 - 2 * math.exp(-1.0) - 1.0) / 3)
    unweighted, _ = algos.policy_loss(torch.log(ratio), torch.zeros_like(ratio), adv, mask, 0.2, torch.ones_like(w))
    assert unweighted.item() == pytest.approx(algos.policy_loss(torch.log(ratio), torch.zeros_like(ratio), adv, mask,
                                                                0.2)[0].item())


def test_clipped_value_loss_by_hand():
    values, old, returns, mask = t([[1.0, 2.0, 5.0]]), t([[0.5, 2.0, 0.0]]), t([[2.0, 0.0, 0.0]]), t([[1, 1, 0]])
    # token 0: unclipped (1-2)^2 = 1, clipped value .5+.2 = .7 -> (.7-2)^2 = 1.69 -> 1.69; token 1: 4 and 4
    loss, info = algos.value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 4.0) / 2)
    assert info["value_clip_frac"].item() == pytest.approx(0.5)
    loss_unclipped, _ = algos.value_loss(values, old, returns, mask, clip=None)
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
    ent = algos.entropy_from_logits(t([[0.0, 0.0], [0.0, math.log(3.0)]]))
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
