"""The "Math" section of dpg_min.py: pure functions of log-probs, against values computed by hand.

Each test builds a batch of 2-4 sequences, writes the expected value out with math.exp /
math.log and compares with tight tolerances (float64: rel 1e-12). Edge cases: P = 0 (log_P = −inf)
is a normal input and never gives NaN; Z = 0; Z as a float or a tensor; float64 log-ratios of ±700
and weights past e^709 stay finite where the result is; the input dtype is kept; gradients flow
only where they should.
"""
import importlib.util
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpg_min as dm

F64, F32 = torch.float64, torch.float32
INF = math.inf
REL = 1e-12  # float64 relative tolerance


def t(xs, dtype=F64, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def close(x, expected, rel=REL):
    """x (tensor) equals expected (list of floats / float) elementwise to relative `rel`, atol 0."""
    expected = torch.as_tensor(expected, dtype=F64)
    return torch.allclose(x.detach().to(F64), expected, rtol=rel, atol=0.0)


def no_nan(*xs):
    return all(not torch.isnan(torch.as_tensor(x)).any() for x in xs)


def logit(u):
    return math.log(u / (1 - u))


# Z in the several forms a caller may pass; 0.75 is exact in float32 too, so all must agree.
Z_FORMS = ["float", "tensor64", "tensor32", "tensor_requires_grad"]
# float(Z) drops a gradient, as it should, and torch warns that it does: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")
ZEROS = [0.0, 0, torch.tensor(0.0, dtype=F64)]


def z_as(form, z):
    """z in one of the Z_FORMS."""
    if form == "float":
        return z
    if form == "tensor32":
        return torch.tensor(z, dtype=F32)
    return torch.tensor(z, dtype=F64, requires_grad=form == "tensor_requires_grad")


# A small batch shared by the advantage / KL / TVD tests: sample 1 has P = 0.
LP_PI = [-1.0, -2.0, -0.5]
LP_Q = [-1.5, -1.0, -2.0]
LOG_P = [-0.3, -INF, -4.0]
LP_M = [-0.7, -1.2, -3.0]
Z0 = 0.75
LZ = math.log(Z0)
A_GDC = [math.exp(-0.3 + 1.5), 0.0, math.exp(-4.0 + 2.0)]                            # P/q
A_GDCPP = [a - Z0 * math.exp(p - q) for a, p, q in zip(A_GDC, LP_PI, LP_Q)]           # P/q − Z·π/q
# D_KL(p‖m) in GDC's form: −log Ẑ + (1/N) Σ (P/(Ẑ·q))·(log P − log m); sample 1 (P = 0) adds 0.
KL_EXPECTED = (math.exp(-0.3 - LZ + 1.5) * (-0.3 + 0.7)
               + math.exp(-4.0 - LZ + 2.0) * (-4.0 + 3.0)) / 3 - LZ
TVD_EXPECTED = 0.5 * (abs(math.exp(-0.3 - LZ + 1.5) - math.exp(-0.7 + 1.5))
                      + abs(0.0 - math.exp(-1.2 + 1.0))
                      + abs(math.exp(-4.0 - LZ + 2.0) - math.exp(-3.0 + 2.0))) / 3


# -- dpg_advantage and dpg_loss ------------------------------------------------------------------


@pytest.mark.parametrize("zform", list(Z_FORMS))
@pytest.mark.parametrize("baseline, expected", [(False, A_GDC), (True, A_GDCPP)])
def test_dpg_advantage_is_P_over_q_minus_the_baseline_Z_pi_over_q(zform, baseline, expected):
    A = dm.dpg_advantage(t(LP_PI), t(LP_Q), t(LOG_P), z_as(zform, Z0), baseline)
    assert A.dtype == F64 and A.shape == (3,) and close(A, expected)
    expected_1 = pytest.approx(-Z0 * math.exp(-1.0), rel=1e-15) if baseline else 0.0
    assert A[1].item() == expected_1                                                # P = 0


def test_dpg_advantage_is_detached():
    lp_pi = t(LP_PI, grad=True)
    lp_q = t(LP_Q, grad=True)
    log_P = t([-0.3, -1.0, -4.0], grad=True)
    for baseline in (False, True):
        Z = torch.tensor(Z0, dtype=F64, requires_grad=True)
        assert not dm.dpg_advantage(lp_pi, lp_q, log_P, Z, baseline).requires_grad


@pytest.mark.parametrize("Z", ZEROS)
def test_dpg_advantage_with_Z_zero_is_the_advantage_without_baseline(Z):
    with_b = dm.dpg_advantage(t(LP_PI), t(LP_Q), t(LOG_P), Z, baseline=True)
    without_b = dm.dpg_advantage(t(LP_PI), t(LP_Q), t(LOG_P), Z, baseline=False)
    assert torch.equal(with_b, without_b) and no_nan(with_b)


def test_dpg_advantage_float64_log_ratios_of_700_are_finite():
    lp_pi = t([-1.0, -1.0])
    lp_q = t([-700.0, 700.0])                                                       # log P/q = ±700
    log_P = t([0.0, 0.0])
    assert close(dm.dpg_advantage(lp_pi, lp_q, log_P, 0.5, False),
                 [math.exp(700.0), math.exp(-700.0)])
    assert close(dm.dpg_advantage(lp_pi, lp_q, log_P, 0.5, True),
                 [math.exp(700.0) - 0.5 * math.exp(699.0),
                  math.exp(-700.0) - 0.5 * math.exp(-701.0)])


@pytest.mark.parametrize("baseline", [False, True])
def test_log_ratios_of_plus_minus_1000_give_inf_or_zero_never_nan_and_check_finite_refuses_inf(
        baseline):
    """exp(−1000) is exactly 0, the right limit; exp(+1000) overflows float64 to +inf, which
    check_finite then refuses, naming the quantity and the step."""
    logp_q = t([-10.0, -10.0])
    A = dm.dpg_advantage(logp_q, logp_q, logp_q + t([-1000.0, 1000.0]), 0.5, baseline)
    assert A[0].item() == (pytest.approx(-0.5, rel=1e-15) if baseline else 0.0)
    assert A[1].item() == INF and no_nan(A)
    with pytest.raises(dm.NotFinite,
                       match="^step 7: advantage A is infinite, so π was not updated"):
        dm.check_finite(7, {"advantage A": A})
    with pytest.raises(dm.NotFinite, match="^step 3: Ẑ is NaN"):
        dm.check_finite(3, {"ok": A[:1], "Ẑ": math.nan})
    dm.check_finite(7, {"advantage A": A[:1], "a float": 2.0})      # finite: nothing happens


@pytest.mark.parametrize("baseline, expected", [(False, A_GDC), (True, A_GDCPP)])
def test_dpg_loss_returns_the_advantage_and_its_gradient_is_minus_A_over_B(baseline, expected):
    lp_pi = t(LP_PI, grad=True)
    loss, A = dm.dpg_loss(lp_pi, t(LP_Q), t(LOG_P), Z0, baseline)
    assert loss.dim() == 0 and loss.dtype == F64 and close(A, expected) and not A.requires_grad
    assert loss.item() == pytest.approx(-sum(a * lp for a, lp in zip(expected, LP_PI)) / 3, rel=REL)
    (g,) = torch.autograd.grad(loss, lp_pi)
    assert close(g, [-a / 3 for a in expected], rel=1e-15)


@pytest.mark.parametrize("baseline", [False, True])
def test_dpg_loss_has_no_gradient_through_q_P_or_Z(baseline):
    lp_q = t([-1.5, -1.0, -2.0, -2.5], grad=True)
    log_P = t([-0.3, -INF, -4.0, -1.0], grad=True)
    Z = torch.tensor(Z0, dtype=F64, requires_grad=True)
    loss, _ = dm.dpg_loss(t([-1.0, -2.0, -0.5, -3.0], grad=True), lp_q, log_P, Z, baseline)
    for g in torch.autograd.grad(loss, [lp_q, log_P, Z], allow_unused=True):
        assert g is None or torch.count_nonzero(g) == 0


# -- reinforce_loss, kl_control_reward, kl_penalty_rewards ---------------------------------------


def test_reinforce_loss_value_gradient_and_detached_reward():
    lp_pi = t([-1.0, -2.0, -0.5, -4.0], grad=True)
    reward = t([2.0, -1.0, 0.5, 3.0], grad=True)
    loss, R = dm.reinforce_loss(lp_pi, reward)
    assert loss.dim() == 0 and torch.equal(R, reward.detach()) and not R.requires_grad
    expected = -(2.0 * -1.0 + -1.0 * -2.0 + 0.5 * -0.5 + 3.0 * -4.0) / 4
    assert loss.item() == pytest.approx(expected, rel=REL)
    g_pi, g_r = torch.autograd.grad(loss, [lp_pi, reward], allow_unused=True)
    assert torch.equal(g_pi, -reward.detach() / 4)
    assert g_r is None or torch.count_nonzero(g_r) == 0


def test_reinforce_loss_treats_a_kl_control_reward_as_a_fixed_number():
    """R depends on log π, yet the gradient is −R/B, not −R/B + β·∇log π/B."""
    lp_pi = t([-1.0, -2.0], grad=True)
    R = dm.kl_control_reward(t([1.0, 0.5]), lp_pi, t([-1.5, -1.5]), 0.5)
    (g,) = torch.autograd.grad(dm.reinforce_loss(lp_pi, R)[0], lp_pi)
    assert close(g, [-(1.0 - 0.5 * 0.5) / 2, -(0.5 - 0.5 * -0.5) / 2], rel=1e-15)


def test_kl_control_reward_values_and_gradients():
    r = t([1.0, 0.0, -2.0], grad=True)
    lp_pi = t([-1.0, -3.0, -0.5], grad=True)
    lp_a = t([-2.0, -1.0, -0.5], grad=True)
    beta = 0.1
    R = dm.kl_control_reward(r, lp_pi, lp_a, beta)
    assert close(R, [1.0 - 0.1 * 1.0, 0.0 - 0.1 * (-2.0), -2.0 - 0.0])
    assert R.requires_grad                                                          # not detached
    g_r, g_pi, g_a = torch.autograd.grad(R.sum(), [r, lp_pi, lp_a])
    assert torch.equal(g_pi, torch.full((3,), -beta, dtype=F64))
    assert torch.equal(g_a, torch.full((3,), beta, dtype=F64))
    assert torch.equal(g_r, torch.ones(3, dtype=F64))


@given(st.integers(1, 5), st.integers(1, 6), st.floats(0.01, 10), st.integers(0, 2**31 - 1))
def test_per_token_kl_penalties_sum_to_the_sequence_kl_control_reward(B, T, beta, seed):
    g = torch.Generator().manual_seed(seed)
    logp_pi = -3 * torch.rand(B, T, generator=g)
    logp_a = -3 * torch.rand(B, T, generator=g)
    R = torch.randint(0, 2, (B,), generator=g).double()
    r = dm.kl_penalty_rewards(logp_pi, logp_a, R, beta)
    assert r.shape == (B, T) and not r.requires_grad
    R_seq = dm.kl_control_reward(R.float(), logp_pi.sum(1), logp_a.sum(1), beta)
    assert torch.allclose(r.sum(1), R_seq, atol=1e-5)
    # the score only at the end
    assert torch.allclose(r[:, :-1], -beta * (logp_pi - logp_a)[:, :-1])


# -- Ziegler's PPO: gae, ppo_loss, adaptive_beta -------------------------------------------------


@given(st.integers(1, 4), st.integers(1, 7), st.floats(0.5, 1), st.floats(0, 1),
       st.integers(0, 2**31 - 1))
def test_gae_equals_the_plain_sum_of_discounted_td_errors(B, T, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=F64)
    V = torch.randn(B, T, generator=g, dtype=F64)
    A, returns = dm.gae(r, V, gamma, lam)
    delta = r + gamma * torch.cat([V[:, 1:], torch.zeros(B, 1, dtype=F64)], dim=1) - V
    expected = [[sum((gamma * lam) ** k * delta[b, s + k].item() for k in range(T - s))
                 for s in range(T)]
                for b in range(B)]
    assert torch.allclose(A, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-10)
    assert torch.allclose(returns, A + V)
    # γ = λ = 1: the returns are the rewards to go
    assert torch.allclose(dm.gae(r, V, 1.0, 1.0)[1], r.flip(1).cumsum(1).flip(1))


def test_ppo_losses_clip_the_ratio_and_the_value_change():
    zero = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    loss, ratio = dm.ppo_policy_loss(logp, zero, torch.tensor([[1.0, -1.0]]), clip=0.2)
    assert torch.allclose(ratio, torch.tensor([[1.5, 0.5]]))
    # A = 1: max(−1.5, −1.2); A = −1: max(0.5, 0.8)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    z = torch.zeros(1, 1)
    loss = dm.ppo_value_loss(torch.tensor([[1.0]]), z, torch.tensor([[2.0]]), clip=0.2)
    # unclipped (1 − 2)² = 1, clipped (0.2 − 2)² = 3.24
    assert loss.item() == pytest.approx(0.5 * 3.24)


def test_ppo_policy_loss_gradient_is_minus_A_where_unclipped():
    # ρ = 1: inside the clip range, d(−Aρ)/dlogp = −A
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = dm.ppo_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[2.0, -1.0]]))
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.tensor([[-1.0, 0.5]]))


def test_adaptive_beta_moves_toward_its_kl_target_with_a_clipped_step():
    # too far from a: more β; too close: less β
    assert dm.adaptive_beta(0.2, kl=12.0, target=6, horizon=10000, n=256) > 0.2
    assert dm.adaptive_beta(0.2, kl=1.0, target=6, horizon=10000, n=256) < 0.2
    assert dm.adaptive_beta(0.2, kl=6.0, target=6, horizon=10000, n=256) == 0.2
    assert dm.adaptive_beta(1.0, kl=600.0, target=6, horizon=100, n=10) == pytest.approx(1.02)
    assert dm.adaptive_beta(1.0, kl=0.0, target=6, horizon=100, n=10) == pytest.approx(0.98)
    # inside the clip
    assert dm.adaptive_beta(1.0, kl=6.6, target=6, horizon=100, n=10) == pytest.approx(1.01)


# -- estimate_Z, kl_p_m, tvd_p_m, kl_reverse, ess ------------------------------------------------


def test_estimate_Z_hand_value_with_P_zero():
    Zh = dm.estimate_Z(t([0.2, -INF, -1.0, 0.5]), t([-1.0, -2.0, -0.5, -3.0]))
    assert Zh.dim() == 0
    expected = 0.25 * (math.exp(1.2) + math.exp(-0.5) + math.exp(3.5))
    assert Zh.item() == pytest.approx(expected, rel=REL)


def test_estimate_Z_of_all_P_zero_is_exactly_zero():
    Zh = dm.estimate_Z(t([-INF, -INF, -INF]), t([-1.0, -2.0, -0.5]))
    assert Zh.item() == 0.0 and no_nan(Zh)


@pytest.mark.parametrize("log_P, logp_q, expected", [
    ([0.0, 0.0], [-700.0, 700.0], 0.5 * (math.exp(700.0) + math.exp(-700.0))),
    ([-700.0, -700.0], [0.0, 0.0], math.exp(-700.0)),
    # e^710 alone overflows; e^710 / 2 does not
    ([710.0, -INF], [0.0, 0.0], math.exp(710.0 - math.log(2.0))),
])
def test_estimate_Z_stays_finite_near_the_float64_limits(log_P, logp_q, expected):
    Zh = dm.estimate_Z(t(log_P), t(logp_q))
    assert torch.isfinite(Zh) and Zh.item() > 0 and Zh.item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("zform", list(Z_FORMS))
@pytest.mark.parametrize("fn, expected", [(dm.kl_p_m, KL_EXPECTED), (dm.tvd_p_m, TVD_EXPECTED)])
def test_kl_and_tvd_of_p_and_m_hand_values_with_P_zero(zform, fn, expected):
    x = fn(t(LOG_P), t(LP_Q), t(LP_M), z_as(zform, Z0))
    assert x.dim() == 0 and x.dtype == F64 and x.item() == pytest.approx(expected, rel=REL)


def test_kl_p_m_with_P_zero_and_m_zero_on_a_sample_adds_zero():
    """0·log(0/0) must be 0, not NaN."""
    kl = dm.kl_p_m(t([-0.3, -INF]), t([-1.0, -0.5]), t([-0.7, -INF]), Z0)
    assert kl.item() == pytest.approx(math.exp(-0.3 - LZ + 1.0) * (-0.3 + 0.7) / 2 - LZ, rel=REL)


def test_kl_p_m_is_zero_when_p_equals_m_and_the_weights_sum_to_one():
    """p = m = q on the samples, P = 2·m, Ẑ = 2: each term is log 2 with weight 1/N, less log Ẑ."""
    lp_m = [math.log(0.25), math.log(0.75)]
    kl = dm.kl_p_m(t([m + math.log(2.0) for m in lp_m]), t(lp_m), t(lp_m), 2.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-15)


def test_kl_p_m_is_the_self_normalised_estimate_when_Z_is_the_samples_own():
    """With Ẑ = estimate_Z of the same samples, the weights P/(N·Ẑ·q) sum to 1, and the estimate is
    the SNIS one Σ w·(log P − log Ẑ − log m)."""
    log_P = t([-0.3, -INF, -4.0, -1.0])
    lp_q = t([-1.5, -1.0, -2.0, -0.5])
    lp_m = t([-0.7, -1.2, -3.0, -2.0])
    Z = dm.estimate_Z(log_P, lp_q)
    w = torch.softmax(log_P - lp_q, 0)
    expected = (w[[0, 2, 3]] * (log_P - Z.log() - lp_m)[[0, 2, 3]]).sum().item()
    assert dm.kl_p_m(log_P, lp_q, lp_m, Z).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("Z", ZEROS)
@pytest.mark.parametrize("fn", [dm.kl_p_m, dm.tvd_p_m])
def test_kl_and_tvd_with_Z_zero_are_inf(Z, fn):
    x = fn(t([-INF, -INF]), t([-1.0, -2.0]), t([-0.5, -0.5]), Z)
    assert x.item() == INF




@pytest.mark.parametrize("Z", ZEROS)
@pytest.mark.parametrize("fn", [dm.kl_p_m, dm.tvd_p_m])
def test_kl_and_tvd_with_Z_zero_have_a_zero_gradient_not_nan(Z, fn):
    """The +inf is a constant: its gradient is 0, and no NaN leaks from the masked branch."""
    lp_m = t([-0.5, -0.5], grad=True)
    (g,) = torch.autograd.grad(fn(t([-INF, -INF]), t([-1.0, -2.0]), lp_m, Z), lp_m)
    assert no_nan(g) and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("fn, log_P, lp_q, lp_m, expected", [
    (dm.kl_p_m, [0.0, 0.0], [-700.0, 700.0], [-1.0, -2.0],
     0.5 * (math.exp(700.0) + math.exp(-700.0) * 2.0)),
    (dm.kl_p_m, [700.0, 700.0], [0.0, 0.0], [0.0, 0.0], math.exp(700.0) * 700.0),
    # 1/N in the exponent
    (dm.kl_p_m, [710.0, -INF], [0.0, 0.0], [709.0, 0.0], math.exp(710.0 - math.log(2.0))),
    (dm.tvd_p_m, [0.0, 0.0], [-700.0, 700.0], [-1.0, -2.0],
     0.25 * (abs(math.exp(700.0) - math.exp(699.0)) + abs(math.exp(-700.0) - math.exp(-702.0)))),
    (dm.tvd_p_m, [710.0, -INF], [0.0, 0.0], [709.0, -1.0],
     0.5 * ((math.exp(710.0 - math.log(2.0)) - math.exp(709.0 - math.log(2.0)))
            + math.exp(-1.0) / 2)),
])
def test_kl_and_tvd_stay_finite_near_the_float64_limits(fn, log_P, lp_q, lp_m, expected):
    x = fn(t(log_P), t(lp_q), t(lp_m), 1.0)
    assert torch.isfinite(x) and x.item() == pytest.approx(expected, rel=REL)


def test_kl_p_m_gradient_wrt_log_m_is_minus_p_over_Nq_and_zero_where_P_is_zero():
    lp_m = t([-0.7, -INF, -3.0], grad=True)
    (g,) = torch.autograd.grad(dm.kl_p_m(t(LOG_P), t(LP_Q), lp_m, Z0), lp_m)
    assert close(g, [-math.exp(-0.3 - LZ + 1.5) / 3, 0.0, -math.exp(-4.0 - LZ + 2.0) / 3])
    assert no_nan(g)


LOG_VALUES = st.floats(-30, 30)


@given(st.lists(st.tuples(st.one_of(LOG_VALUES, st.just(-INF)), LOG_VALUES, LOG_VALUES),
                min_size=1, max_size=12), st.floats(-20, 20), st.sampled_from([0.02, 1.0, 7.0]))
def test_q_check_is_self_normalised_bounded_and_decides_as_gdcs_form(rows, shift, Z):
    """q_check divides P/q and π/q by their means on the sample: its estimates do not move when P
    is scaled (p is the same), TVD̂ ≤ 1, KL̂ is the SNIS sum, and "q ← π if KL̂(p‖π) < KL̂(p‖q)"
    decides as with naver/gdc's form under any Ẑ > 0 (their gap does not depend on π)."""
    log_P, lp_q, lp_pi = (t(list(column)) for column in zip(*rows))
    c = dm.q_check(log_P, lp_q, lp_pi)
    if not (log_P > -INF).any():                        # no P > 0: nothing to estimate
        assert c["kl_p_pi"] == c["kl_p_q"] == c["tvd_p_pi"] == INF
        return
    scaled = dm.q_check(log_P + shift, lp_q, lp_pi)
    for key in ("kl_p_pi", "kl_p_q", "tvd_p_pi"):
        assert scaled[key] == pytest.approx(c[key], rel=1e-9, abs=1e-9)
    assert 0 <= c["tvd_p_pi"] <= 1 + 1e-12
    w = torch.softmax(log_P - lp_q, 0)
    held = log_P > -INF
    snis = (w[held] * (log_P - lp_pi)[held]).sum() - dm.estimate_Z(log_P, lp_q).log()
    assert c["kl_p_pi"] == pytest.approx(snis.item(), rel=1e-9, abs=1e-9)
    gdc = dm.kl_p_m(log_P, lp_q, lp_pi, Z) - dm.kl_p_m(log_P, lp_q, lp_q, Z)
    if abs(gdc) > 1e-6 * (1 + abs(c["kl_p_pi"]) + abs(c["kl_p_q"])):   # not a tie up to rounding
        assert (c["kl_p_pi"] < c["kl_p_q"]) == (gdc < 0)


def test_tvd_p_pi_is_mean_abs_gdcpp_advantage_over_2Z():
    """Paper eq. 21: E_q|A| = 2·Z·TVD(p, π), A the GDC++ advantage."""
    A = dm.dpg_advantage(t(LP_PI), t(LP_Q), t(LOG_P), Z0, baseline=True)
    tvd = dm.tvd_p_m(t(LOG_P), t(LP_Q), t(LP_PI), Z0).item()
    assert A.abs().mean().item() == pytest.approx(2 * Z0 * tvd, rel=REL)


def test_all_P_zero_batch_gives_no_nan_anywhere():
    log_P = t([-INF] * 4)
    lp_q = t([-1.0, -2.0, -0.5, -3.0])
    lp_pi = t([-1.5, -1.0, -2.0, -2.5], grad=True)
    Zh = dm.estimate_Z(log_P, lp_q)
    assert Zh.item() == 0.0
    for baseline in (False, True):
        loss, A = dm.dpg_loss(lp_pi, lp_q, log_P, Zh, baseline)
        (g,) = torch.autograd.grad(loss, lp_pi)
        assert torch.equal(A, torch.zeros(4, dtype=F64))
        assert loss.item() == 0.0 and torch.count_nonzero(g) == 0
    stats = dm.batch_stats(A, log_P, lp_q, lp_pi.detach(), Zh.item(), dpg=True)
    assert stats == dict(mean_A=0.0, mean_abs_A=0.0, var_A=0.0, mean_P_q=0.0, mean_Zpi_q=0.0)
    assert dm.ess(log_P - lp_q) == 0.0


def test_kl_reverse_hand_value():
    kl = dm.kl_reverse(t([-1.0, -2.5, -0.25]), t([-1.5, -2.0, -3.0]))
    assert kl.dim() == 0 and kl.item() == pytest.approx((0.5 - 0.5 + 2.75) / 3, rel=REL)


@pytest.mark.parametrize("log_w, expected", [
    ([0.0] * 10, 10.0),                           # equal weights: N
    ([0.0, -1000.0, -1000.0], 1.0),               # one dominates: 1
    ([1000.0, 1000.0, -INF], 2.0),                # beyond e^709, and a zero weight
    ([0.0, math.log(3.0)], 16 / 10),              # (1 + 3)² / (1 + 9)
    ([-INF] * 4, 0.0),                            # P = 0 everywhere
])
def test_ess_is_kish_effective_sample_size(log_w, expected):
    assert dm.ess(t(log_w)) == pytest.approx(expected, rel=1e-12)


# -- batch_stats and grad_variance ---------------------------------------------------------------


def test_batch_stats_hand_values_and_fig_2_parts():
    A = t([1.0, -3.0, 2.0, 0.0])
    log_P = t([0.0, -INF, math.log(2.0), -1.0])
    lp_q = t([0.0, 0.0, 0.0, -1.0])
    lp_pi = t([math.log(0.5)] * 4)
    s = dm.batch_stats(A, log_P, lp_q, lp_pi, 0.4, dpg=True)
    assert s["mean_A"] == 0.0 and s["mean_abs_A"] == 1.5
    assert s["var_A"] == pytest.approx(14 / 4, rel=REL)
    assert s["mean_P_q"] == pytest.approx((1 + 0 + 2 + 1) / 4, rel=REL)
    assert s["mean_Zpi_q"] == pytest.approx(0.4 * (0.5 + 0.5 + 0.5 + 0.5 * math.e) / 4, rel=REL)
    # not DPG: no Fig. 2 parts
    assert dm.batch_stats(A, log_P, lp_q, lp_pi, 0.4, dpg=False)["mean_P_q"] is None


def test_grad_variance_equals_a_brute_force_computation_from_stacked_gradients():
    """Var(G) by running sums (eq. 18) = E‖G − E G‖² from every per-sample gradient stacked
    (eq. 17)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    # skipped, as a's weights would be
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def loss_of(j):
        return (model(x[j]) ** 2).sum() * frozen

    params = list(model.parameters())

    def flat_grad(j):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss_of(j), params)]).double()

    G = torch.stack([flat_grad(j) for j in range(5)])
    brute = ((G - G.mean(0)) ** 2).sum(1).mean().item()
    losses = (loss_of(j) for j in range(5))         # built one at a time, as train's
    assert brute > 0
    assert dm.grad_variance(params + [frozen], losses) == pytest.approx(brute, rel=1e-9)


# -- fit_lambdas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, mu", [(0.0, 0.0, 0.3), (0.0, 0.0, 0.9), (0.7, -0.4, 0.2)])
def test_fit_lambdas_one_feature_analytic(a, b, mu):
    """N = 2, φ = (1, 0), w = (e^a, e^b): μ̂(λ) = e^(a+λ) / (e^(a+λ) + e^b),
    so λ = logit(μ̄) + b − a."""
    lam, mu_hat = dm.fit_lambdas(t([[1.0], [0.0]]), t([a, b]), [mu], tol=1e-13)
    assert lam.shape == mu_hat.shape == (1,)
    assert lam.item() == pytest.approx(logit(mu) + b - a, abs=1e-10)
    assert mu_hat.item() == pytest.approx(mu, abs=1e-13)


def test_fit_lambdas_two_independent_features_analytic():
    """φ over all of {0,1}² with w = 1: p factorises, so λ_i = logit(μ̄_i)."""
    phi = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    lam, mu_hat = dm.fit_lambdas(phi, t([0.0] * 4), [0.3, 0.8], tol=1e-13)
    assert close(lam, [logit(0.3), logit(0.8)], rel=1e-10) and close(mu_hat, [0.3, 0.8], rel=1e-12)


@pytest.mark.parametrize("tol", [1e-2, 1e-6, 1e-12])
def test_fit_lambdas_reaches_targets_within_tol_and_returns_the_snis_moment(tol):
    phi = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    log_w = t([-0.5, 0.3, -1.2, 0.1])
    mu_bar = t([0.6, 0.25])
    if tol == 1e-2:                                     # the default tol
        lam, mu_hat = dm.fit_lambdas(phi, log_w, mu_bar)
    else:
        lam, mu_hat = dm.fit_lambdas(phi, log_w, mu_bar, tol=tol)
    assert torch.linalg.vector_norm(mu_bar - mu_hat).item() < tol
    omega = torch.softmax(log_w + phi @ lam, 0)
    assert close(mu_hat, (omega @ phi).tolist(), rel=1e-12)


def test_fit_lambdas_with_no_iteration_returns_lambda_zero_and_the_weighted_moment():
    phi = t([[1.0], [0.0], [1.0]])
    log_w = t([0.0, math.log(2.0), math.log(3.0)])
    lam, mu_hat = dm.fit_lambdas(phi, log_w, [0.9], max_iters=0)
    assert lam.tolist() == [0.0]
    assert mu_hat.item() == pytest.approx((1.0 + 3.0) / (1.0 + 2.0 + 3.0), rel=REL)


@pytest.mark.parametrize("mu, tol", [(1.0, 1e-2), (1.0, 1e-6), (0.0, 1e-6)])
def test_fit_lambdas_target_zero_or_one_stops_within_tol_with_a_finite_lambda(mu, tol):
    lam, mu_hat = dm.fit_lambdas(t([[1.0], [0.0]]), t([0.0, 0.0]), [mu], tol=tol)
    assert torch.isfinite(lam).all() and abs(mu - mu_hat.item()) < tol and no_nan(lam, mu_hat)
    assert abs(lam.item()) > logit(1.0 - tol)       # μ̂ within tol of 0 or 1 ⇔ |λ| > logit(1 − tol)


@pytest.mark.parametrize("phi, mu_bar, message", [
    ([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]], [0.5, 0.3], r"feature 1 never fires in the 3 samples"),
    ([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]], [0.5, 0.3], r"feature 0 never fires"),
    ([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]], [0.5, 0.3], r"feature 0 takes the single value 1"),
    ([[0.0, 2.0], [1.0, 2.0], [1.0, 2.0]], [0.5, 1.0], r"feature 1 takes the single value 2"),
])
def test_fit_lambdas_constant_feature_off_its_target_raises_naming_it(phi, mu_bar, message):
    with pytest.raises(ValueError, match=message):
        dm.fit_lambdas(t(phi), t([0.0] * len(phi)), mu_bar)


def test_fit_lambdas_constant_feature_at_its_target_is_fine():
    phi = t([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    lam, mu_hat = dm.fit_lambdas(phi, t([0.0, 0.0]), [0.3, 0.0, 1.0], tol=1e-12)
    assert torch.isfinite(lam).all() and close(mu_hat, [0.3, 0.0, 1.0], rel=1e-11)
    assert lam[0].item() == pytest.approx(logit(0.3), abs=1e-9)


def test_fit_lambdas_drops_samples_of_weight_zero():
    """log w = −inf (outside a hard constraint) is a sample p cannot hold: the fit is that of the
    others."""
    phi = t([[1.0], [0.0], [1.0], [0.0]])
    log_w = t([0.0, 0.5, -INF, -INF])
    lam, mu_hat = dm.fit_lambdas(phi, log_w, [0.4], tol=1e-13)
    assert lam.item() == pytest.approx(logit(0.4) + 0.5, abs=1e-10) and no_nan(lam, mu_hat)
    lam2, _ = dm.fit_lambdas(phi[:2], log_w[:2], [0.4], tol=1e-13)
    assert lam.item() == pytest.approx(lam2.item(), abs=1e-12)


@pytest.mark.parametrize("log_w, message", [
    ([0.0, -INF], "feature 0 takes the single value 1 in the 1 samples"),    # only φ = 1 survives
    ([-INF, -INF], "feature 0 never fires in the 0 samples"),               # nothing survives
])
def test_fit_lambdas_judges_a_constant_feature_on_the_samples_it_keeps(log_w, message):
    with pytest.raises(ValueError, match=message):
        dm.fit_lambdas(t([[1.0], [0.0]]), t(log_w), [0.5])


@pytest.mark.parametrize("phi, mu_bar", [
    ([[0.0, 0.0], [1.0, 1.0]] * 5, [0.5, 0.75]),        # the features always agree: μ̄ needs not
    ([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0],
      [0, 1, 0]], [0.75, 0.25, 0.75]),                 # λ overflowed to ±inf here: an SVD error
])
def test_fit_lambdas_says_when_no_weighting_of_the_samples_reaches_mu_bar(phi, mu_bar):
    """Each feature's μ̄ lies between its values, but μ̄ lies outside their convex hull: the dual g
    grows without bound. It passes −log min w, its largest value for a reachable μ̄, in a few
    steps."""
    with pytest.raises(ValueError, match=r"no weighting of the \d+ samples averages φ to μ̄"):
        dm.fit_lambdas(t(phi), t([0.0] * len(phi)), mu_bar)


@settings(max_examples=30)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=3, max_size=3), min_size=1,
                max_size=12), st.lists(st.floats(0.05, 0.95), min_size=3, max_size=3))
def test_fit_lambdas_ends_in_a_finite_lambda_or_a_value_error(phi, mu_bar):
    try:
        lam, mu_hat = dm.fit_lambdas(t(phi), t([0.0] * len(phi)), mu_bar)
    except ValueError:
        return
    assert torch.isfinite(lam).all() and torch.isfinite(mu_hat).all()


# -- dtype: every function keeps its input's -----------------------------------------------------


CASES = ["dpg_advantage", "dpg_loss", "reinforce_loss", "kl_control_reward", "kl_penalty_rewards",
         "gae", "estimate_Z", "kl_p_m", "kl_p_m Z=0", "tvd_p_m", "kl_reverse", "fit_lambdas"]


def _case(name, dtype):
    """The output of the function `name` on inputs of `dtype`."""
    def a(xs):
        return t(xs, dtype)

    if name == "dpg_advantage":
        return dm.dpg_advantage(a(LP_PI), a(LP_Q), a(LOG_P), Z0, True)
    if name == "dpg_loss":
        return dm.dpg_loss(a(LP_PI), a(LP_Q), a(LOG_P), torch.tensor(Z0, dtype=F64), True)[0]
    if name == "reinforce_loss":
        return dm.reinforce_loss(a([-1.0, -2.0]), a([1.0, 2.0]))[0]
    if name == "kl_control_reward":
        return dm.kl_control_reward(a([1.0, 0.0]), a([-1.0, -3.0]), a([-2.0, -1.0]), 0.1)
    if name == "kl_penalty_rewards":
        return dm.kl_penalty_rewards(a([[-1.0, -3.0]]), a([[-2.0, -1.0]]), t([1.0]), 0.1)
    if name == "gae":
        return dm.gae(a([[1.0, 0.5]]), a([[0.2, 0.1]]))[0]
    if name == "estimate_Z":
        return dm.estimate_Z(a([0.2, -INF]), a([-1.0, -2.0]))
    if name == "kl_p_m":
        return dm.kl_p_m(a(LOG_P), a(LP_Q), a(LP_M), Z0)
    if name == "kl_p_m Z=0":
        return dm.kl_p_m(a([-INF, -INF]), a([-1.0, -2.0]), a([-0.5, -0.5]), 0.0)
    if name == "tvd_p_m":
        return dm.tvd_p_m(a(LOG_P), a(LP_Q), a(LP_M), Z0)
    if name == "kl_reverse":
        return dm.kl_reverse(a([-1.0, -2.0]), a([-1.5, -1.0]))
    if name == "fit_lambdas":
        return dm.fit_lambdas(torch.tensor([[True], [False]]), a([0.0, 0.0]), [0.3], tol=1e-4)[0]
    raise KeyError(name)


@pytest.mark.parametrize("name", CASES)
def test_functions_keep_the_input_dtype_and_agree_across_dtypes(name):
    x32 = _case(name, F32)
    x64 = _case(name, F64)
    assert x32.dtype == F32 and x64.dtype == F64
    assert (torch.allclose(x32.double(), x64, rtol=1e-4, atol=1e-6)
            or (x32.isinf().all() and x64.isinf().all()))


# -- diversity (§4.2): Distinct-n and Self-BLEU-n on hand-computed examples ----------------------


def test_tokens_are_words_and_punctuation_runs():
    assert dm.tokens_of("Hi, there!! it's") == ["Hi", ",", "there", "!!", "it", "'", "s"]


@pytest.mark.parametrize("texts, n, expected", [
    (["a b a"], 1, 2 / 3),                    # a, b, a: two distinct of three
    (["a b a"], 2, 1.0),                      # (a b), (b a)
    (["a b", "a b"], 2, 1 / 2),               # the same bigram in both samples
    (["a b c", "d e f"], 1, 1.0),
    (["x x x x"], 1, 1 / 4),
    (["a b", "b c"], 3, math.nan),            # no trigram at all; n-grams never span two texts
])
def test_distinct_n(texts, n, expected):
    got = dm.distinct_n(texts, n)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_self_bleu_of_identical_samples_is_one():
    assert dm.self_bleu(["the cat sat on the mat"] * 3) == pytest.approx([1.0, 1.0, 1.0])


def test_self_bleu_of_partly_shared_samples():
    """a b c d vs a b c e: p1 = 3/4, p2 = 2/3, p3 = 1/2, no 4-gram in common (method1: 0.1/1),
    BP = 1."""
    bleu3, bleu4 = dm.self_bleu(["a b c d", "a b c e"], (3, 4))
    assert bleu3 == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3))
    assert bleu4 == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 0.1) ** (1 / 4))


def test_self_bleu_of_disjoint_samples_is_zero():
    """No token in common: nltk gives 0 (smoothing only fills in longer n-grams once a unigram
    matches)."""
    assert dm.self_bleu(["a b c d e", "f g h i j"]) == [0, 0, 0]
    expected = (1 / 5 * 0.1 / 4 * 0.1 / 3) ** (1 / 3)
    assert dm.self_bleu(["a b c d e", "a g h i j"], (3,))[0] == pytest.approx(expected)


def test_self_bleu_of_a_single_sample_is_nan():
    assert all(math.isnan(x) for x in dm.self_bleu(["alone"], (3,)))


def load_bench():
    """figures/self_bleu_bench.py, whose nltk_self_bleu is the oracle: nltk's own sentence_bleu of
    each text against all the others, averaged."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "figures",
                        "self_bleu_bench.py")
    spec = importlib.util.spec_from_file_location("self_bleu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


nltk_self_bleu = load_bench().nltk_self_bleu


# Texts of few, short words, so that n-grams, whole texts and lengths repeat; "" and one word too
WORDS = st.sampled_from(["a", "b", "c", "the", ",", "."])
TEXTS = st.lists(st.lists(WORDS, max_size=9).map(" ".join), min_size=2, max_size=12)


@given(TEXTS, st.sampled_from([(3, 4, 5), (1, 2), (4,)]))
def test_self_bleu_equals_nltks_sentence_bleu_against_all_other_texts(texts, ns):
    assert dm.self_bleu(texts, ns) == pytest.approx(nltk_self_bleu(texts, ns), rel=1e-12,
                                                    abs=1e-12)


def test_self_bleu_equals_nltk_on_identical_texts_and_on_texts_alone_in_their_words():
    for texts in (["a b a b"] * 3, ["a b", "a b", "c"], ["", "", "a"], ["a", "b"], ["", "a b c"]):
        assert dm.self_bleu(texts) == pytest.approx(nltk_self_bleu(texts, (3, 4, 5)), abs=1e-12)
