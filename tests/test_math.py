"""Unit tests for the "Math" section of dpg_min.py, against values computed by hand.

Each test builds a batch of 2-4 sequences, writes the expected value out with math.exp / math.log,
and compares with tight tolerances (float64: rel 1e-12). Edge cases from the issue:
P = 0 (log_P = −inf) is a normal input and never gives NaN; the input dtype is kept; float64
log-ratios of ±700 stay finite; Z may be a Python float or a 0-dim tensor; Z = 0; gradients flow
only where they should.
"""
import math

import pytest
import torch

import dpg_min as dm

F64, F32 = torch.float64, torch.float32
INF = math.inf
REL = 1e-12  # float64 relative tolerance


def t(xs, dtype=F64, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def close(x, expected, rel=REL):
    """x (tensor) equals expected (list of floats / float) elementwise to relative `rel` (atol 0)."""
    exp_t = torch.as_tensor(expected, dtype=F64)
    return torch.allclose(x.detach().to(F64), exp_t, rtol=rel, atol=0.0)


def no_nan(*xs):
    return all(not torch.isnan(torch.as_tensor(x)).any() for x in xs)


# Z in the several forms a caller may pass; 0.75 is exact in float32 too, so all must agree.
Z_FORMS = {
    "float": lambda z: z,
    "tensor64": lambda z: torch.tensor(z, dtype=F64),
    "tensor32": lambda z: torch.tensor(z, dtype=F32),
    "tensor_requires_grad": lambda z: torch.tensor(z, dtype=F64, requires_grad=True),
}


# A small batch shared by the advantage / KL / TVD tests: sample 1 has P = 0.
LP_PI = [-1.0, -2.0, -0.5]
LP_Q = [-1.5, -1.0, -2.0]
LOG_P = [-0.3, -INF, -4.0]
LP_M = [-0.7, -1.2, -3.0]
Z0 = 0.75


# -----------------------------------------------------------------------------
# dpg_advantage
# -----------------------------------------------------------------------------

def test_dpg_advantage_no_baseline_is_P_over_q():
    A = dm.dpg_advantage(t(LP_PI), t(LP_Q), t(LOG_P), Z0, baseline=False)
    expected = [math.exp(-0.3 + 1.5), 0.0, math.exp(-4.0 + 2.0)]
    assert A.dtype == F64 and A.shape == (3,)
    assert close(A, expected)
    assert A[1].item() == 0.0  # P = 0 gives exactly 0


@pytest.mark.parametrize("zform", list(Z_FORMS))
def test_dpg_advantage_baseline_subtracts_Z_pi_over_q(zform):
    A = dm.dpg_advantage(t(LP_PI), t(LP_Q), t(LOG_P), Z_FORMS[zform](Z0), baseline=True)
    expected = [
        math.exp(-0.3 + 1.5) - Z0 * math.exp(-1.0 + 1.5),
        0.0 - Z0 * math.exp(-2.0 + 1.0),
        math.exp(-4.0 + 2.0) - Z0 * math.exp(-0.5 + 2.0),
    ]
    assert A.dtype == F64
    assert close(A, expected)


def test_dpg_advantage_is_detached():
    lp_pi, lp_q, log_P = t(LP_PI, grad=True), t(LP_Q, grad=True), t([-0.3, -1.0, -4.0], grad=True)
    for baseline in (False, True):
        A = dm.dpg_advantage(lp_pi, lp_q, log_P, torch.tensor(Z0, dtype=F64, requires_grad=True),
                             baseline=baseline)
        assert not A.requires_grad


def test_dpg_advantage_Z_zero_with_baseline_equals_no_baseline():
    for Z in (0.0, 0, torch.tensor(0.0, dtype=F64)):
        with_b = dm.dpg_advantage(t(LP_PI), t(LP_Q), t(LOG_P), Z, baseline=True)
        without = dm.dpg_advantage(t(LP_PI), t(LP_Q), t(LOG_P), Z, baseline=False)
        assert torch.equal(with_b, without)
        assert no_nan(with_b)


def test_dpg_advantage_float64_log_ratios_of_700_are_finite():
    lp_pi, lp_q, log_P = t([-1.0, -1.0]), t([-700.0, 700.0]), t([0.0, 0.0])  # log P/q = ±700
    A0 = dm.dpg_advantage(lp_pi, lp_q, log_P, 0.5, baseline=False)
    A1 = dm.dpg_advantage(lp_pi, lp_q, log_P, 0.5, baseline=True)
    assert torch.isfinite(A0).all() and torch.isfinite(A1).all()
    assert close(A0, [math.exp(700.0), math.exp(-700.0)])
    assert close(A1, [math.exp(700.0) - 0.5 * math.exp(699.0),
                      math.exp(-700.0) - 0.5 * math.exp(-701.0)])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("baseline", [False, True])
def test_dpg_advantage_keeps_dtype(dtype, baseline):
    A = dm.dpg_advantage(t(LP_PI, dtype), t(LP_Q, dtype), t(LOG_P, dtype), Z0, baseline=baseline)
    assert A.dtype == dtype
    expected = dm.dpg_advantage(t(LP_PI), t(LP_Q), t(LOG_P), Z0, baseline=baseline)
    assert close(A, expected.tolist(), rel=1e-5)


# -----------------------------------------------------------------------------
# dpg_loss
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("baseline", [False, True])
def test_dpg_loss_gradient_is_minus_A_over_B_and_only_through_logp_pi(baseline):
    # B = 4, a power of two: −A/B is exact in floating point.
    lp_pi = t([-1.0, -2.0, -0.5, -3.0], grad=True)
    lp_q = t([-1.5, -1.0, -2.0, -2.5], grad=True)
    log_P = t([-0.3, -INF, -4.0, -1.0], grad=True)
    Z = torch.tensor(Z0, dtype=F64, requires_grad=True)
    loss = dm.dpg_loss(lp_pi, lp_q, log_P, Z, baseline)
    assert loss.dim() == 0 and loss.dtype == F64
    g_pi, g_q, g_P, g_Z = torch.autograd.grad(loss, [lp_pi, lp_q, log_P, Z], allow_unused=True)
    A = dm.dpg_advantage(lp_pi, lp_q, log_P, Z, baseline)
    assert torch.equal(g_pi, -A / 4)
    for g in (g_q, g_P, g_Z):
        assert g is None or torch.count_nonzero(g) == 0
    assert no_nan(loss, g_pi)


def test_dpg_loss_gradient_hand_values_B3():
    lp_pi = t(LP_PI, grad=True)
    loss = dm.dpg_loss(lp_pi, t(LP_Q), t(LOG_P), Z0, baseline=True)
    (g,) = torch.autograd.grad(loss, lp_pi)
    A = [math.exp(1.2) - Z0 * math.exp(0.5), -Z0 * math.exp(-1.0), math.exp(-2.0) - Z0 * math.exp(1.5)]
    assert close(g, [-a / 3 for a in A], rel=1e-15)
    # The loss value is −mean(A·logπ).
    assert loss.item() == pytest.approx(-sum(a * l for a, l in zip(A, LP_PI)) / 3, rel=REL)


def test_dpg_loss_baseline_changes_gradient():
    lp_pi = t(LP_PI, grad=True)
    (g0,) = torch.autograd.grad(dm.dpg_loss(lp_pi, t(LP_Q), t(LOG_P), Z0, False), lp_pi)
    (g1,) = torch.autograd.grad(dm.dpg_loss(lp_pi, t(LP_Q), t(LOG_P), Z0, True), lp_pi)
    # Difference is +Z·π/q / B per sample.
    diff = [Z0 * math.exp(p - q) / 3 for p, q in zip(LP_PI, LP_Q)]
    assert close(g1 - g0, diff, rel=1e-12)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_dpg_loss_keeps_dtype(dtype):
    lp_pi = t(LP_PI, dtype, grad=True)
    loss = dm.dpg_loss(lp_pi, t(LP_Q, dtype), t(LOG_P, dtype), torch.tensor(Z0, dtype=F64), True)
    (g,) = torch.autograd.grad(loss, lp_pi)
    assert loss.dtype == dtype and g.dtype == dtype


# -----------------------------------------------------------------------------
# kl_control_reward
# -----------------------------------------------------------------------------

def test_kl_control_reward_values():
    R = dm.kl_control_reward(t([1.0, 0.0, -2.0]), t([-1.0, -3.0, -0.5]), t([-2.0, -1.0, -0.5]), 0.1)
    assert close(R, [1.0 - 0.1 * 1.0, 0.0 - 0.1 * (-2.0), -2.0 - 0.0])


def test_kl_control_reward_gradients():
    r, lp_pi, lp_a = t([1.0, 0.0], grad=True), t([-1.0, -3.0], grad=True), t([-2.0, -1.0], grad=True)
    beta = 0.3
    R = dm.kl_control_reward(r, lp_pi, lp_a, beta)
    assert R.requires_grad  # not detached
    g_r, g_pi, g_a = torch.autograd.grad(R.sum(), [r, lp_pi, lp_a])
    assert torch.equal(g_pi, torch.full((2,), -beta, dtype=F64))
    assert torch.equal(g_a, torch.full((2,), beta, dtype=F64))
    assert torch.equal(g_r, torch.ones(2, dtype=F64))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_kl_control_reward_keeps_dtype(dtype):
    R = dm.kl_control_reward(t([1.0, 0.0], dtype), t([-1.0, -3.0], dtype), t([-2.0, -1.0], dtype), 0.1)
    assert R.dtype == dtype


# -----------------------------------------------------------------------------
# reinforce_loss
# -----------------------------------------------------------------------------

def test_reinforce_loss_value_and_gradient():
    lp_pi = t([-1.0, -2.0, -0.5, -4.0], grad=True)
    reward = t([2.0, -1.0, 0.5, 3.0], grad=True)
    loss = dm.reinforce_loss(lp_pi, reward)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(-(2.0 * -1.0 + -1.0 * -2.0 + 0.5 * -0.5 + 3.0 * -4.0) / 4, rel=REL)
    g_pi, g_r = torch.autograd.grad(loss, [lp_pi, reward], allow_unused=True)
    assert torch.equal(g_pi, -reward.detach() / 4)
    assert g_r is None or torch.count_nonzero(g_r) == 0


def test_reinforce_loss_reward_from_kl_control_gets_no_grad():
    # A reward that depends on logp_pi is still a fixed number: gradient is −R/B, not −R/B + β·logπ/B.
    lp_pi = t([-1.0, -2.0], grad=True)
    R = dm.kl_control_reward(t([1.0, 0.5]), lp_pi, t([-1.5, -1.5]), 0.5)
    (g,) = torch.autograd.grad(dm.reinforce_loss(lp_pi, R), lp_pi)
    assert close(g, [-(1.0 - 0.5 * 0.5) / 2, -(0.5 - 0.5 * -0.5) / 2], rel=1e-15)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_reinforce_loss_keeps_dtype(dtype):
    assert dm.reinforce_loss(t([-1.0, -2.0], dtype), t([1.0, 2.0], dtype)).dtype == dtype


# -----------------------------------------------------------------------------
# estimate_Z
# -----------------------------------------------------------------------------

def test_estimate_Z_hand_value_with_P_zero():
    Zh = dm.estimate_Z(t([0.2, -INF, -1.0, 0.5]), t([-1.0, -2.0, -0.5, -3.0]))
    assert Zh.dim() == 0
    assert Zh.item() == pytest.approx(0.25 * (math.exp(1.2) + 0.0 + math.exp(-0.5) + math.exp(3.5)), rel=REL)


def test_estimate_Z_all_P_zero_is_exactly_zero():
    Zh = dm.estimate_Z(t([-INF, -INF, -INF]), t([-1.0, -2.0, -0.5]))
    assert Zh.item() == 0.0 and no_nan(Zh)


def test_estimate_Z_float64_log_ratios_of_700_are_finite():
    Zh = dm.estimate_Z(t([0.0, 0.0]), t([-700.0, 700.0]))
    assert torch.isfinite(Zh)
    assert Zh.item() == pytest.approx(0.5 * (math.exp(700.0) + math.exp(-700.0)), rel=REL)
    Zh2 = dm.estimate_Z(t([700.0, 700.0, 700.0, 700.0]), t([0.0, 0.0, 0.0, 0.0]))
    assert Zh2.item() == pytest.approx(math.exp(700.0), rel=REL)
    Zh3 = dm.estimate_Z(t([-700.0, -700.0]), t([0.0, 0.0]))
    assert Zh3.item() == pytest.approx(math.exp(-700.0), rel=REL) and Zh3.item() > 0


def test_estimate_Z_single_weight_past_float64_max_is_finite():
    # e^710 alone overflows float64, but Ẑ = e^710 / 2 does not: log N is subtracted before exp.
    Zh = dm.estimate_Z(t([710.0, -INF]), t([0.0, 0.0]))
    assert torch.isfinite(Zh)
    assert Zh.item() == pytest.approx(math.exp(710.0 - math.log(2.0)), rel=REL)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_estimate_Z_keeps_dtype(dtype):
    Zh = dm.estimate_Z(t([0.2, -INF], dtype), t([-1.0, -2.0], dtype))
    assert Zh.dtype == dtype
    assert Zh.item() == pytest.approx(0.5 * math.exp(1.2), rel=1e-6)


# -----------------------------------------------------------------------------
# kl_p_m
# -----------------------------------------------------------------------------

def _kl_expected(log_P, lp_q, lp_m, Z):
    N, lz, s = len(log_P), math.log(Z), 0.0
    for P, q, m in zip(log_P, lp_q, lp_m):
        if P == -INF:
            continue  # P = 0 contributes 0
        lp = P - lz
        s += math.exp(lp - q) * (lp - m)
    return s / N


@pytest.mark.parametrize("zform", list(Z_FORMS))
def test_kl_p_m_hand_value_with_P_zero(zform):
    kl = dm.kl_p_m(t(LOG_P), t(LP_Q), t(LP_M), Z_FORMS[zform](Z0))
    lz = math.log(Z0)
    expected = (math.exp(-0.3 - lz + 1.5) * (-0.3 - lz + 0.7)
                + 0.0
                + math.exp(-4.0 - lz + 2.0) * (-4.0 - lz + 3.0)) / 3
    assert expected == pytest.approx(_kl_expected(LOG_P, LP_Q, LP_M, Z0), rel=1e-15)
    assert kl.dim() == 0 and kl.dtype == F64
    assert kl.item() == pytest.approx(expected, rel=REL)


def test_kl_p_m_P_zero_with_m_zero_contributes_zero():
    # P = 0 and m = 0 on the same sample: 0·log(0/0) must be 0, not NaN.
    kl = dm.kl_p_m(t([-0.3, -INF]), t([-1.0, -0.5]), t([-0.7, -INF]), Z0)
    assert no_nan(kl)
    assert kl.item() == pytest.approx(_kl_expected([-0.3], [-1.0], [-0.7], Z0) / 2, rel=REL)


def test_kl_p_m_exact_p_equals_m_is_zero():
    # P = Z·m on every sample, one of them with P = m = 0: KL is exactly 0.
    lp_m = [math.log(0.25), math.log(0.75), -INF]
    log_P = [m + math.log(2.0) for m in lp_m]
    kl = dm.kl_p_m(t(log_P), t([-1.0, -1.0, -1.0]), t(lp_m), 2.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("Z", [0.0, 0, torch.tensor(0.0, dtype=F64)])
def test_kl_p_m_Z_zero_is_inf(Z):
    kl = dm.kl_p_m(t([-INF, -INF]), t([-1.0, -2.0]), t([-0.5, -0.5]), Z)
    assert kl.item() == INF and no_nan(kl)


def test_kl_p_m_float64_log_ratios_of_700_are_finite():
    kl = dm.kl_p_m(t([0.0, 0.0]), t([-700.0, 700.0]), t([-1.0, -2.0]), 1.0)
    assert torch.isfinite(kl)
    assert kl.item() == pytest.approx(0.5 * (math.exp(700.0) * 1.0 + math.exp(-700.0) * 2.0), rel=REL)
    # Two weights of e^700 each with a log-ratio of 700: still finite.
    kl2 = dm.kl_p_m(t([700.0, 700.0]), t([0.0, 0.0]), t([0.0, 0.0]), 1.0)
    assert torch.isfinite(kl2)
    assert kl2.item() == pytest.approx(math.exp(700.0) * 700.0, rel=REL)


def test_kl_p_m_weight_past_float64_max_is_finite():
    # The 1/N is folded into the exponent: p/q = e^710 overflows alone, p/(N·q) = e^710 / 2 does not.
    kl = dm.kl_p_m(t([710.0, -INF]), t([0.0, 0.0]), t([709.0, 0.0]), 1.0)
    assert torch.isfinite(kl)
    assert kl.item() == pytest.approx(math.exp(710.0 - math.log(2.0)) * 1.0, rel=REL)


def test_kl_p_m_gradient_wrt_logp_m():
    # d KL / d log m_i = −(p_i/q_i)/N, and 0 for a sample with P = 0 (even where m = 0 too).
    lp_m = t([-0.7, -INF, -3.0], grad=True)
    (g,) = torch.autograd.grad(dm.kl_p_m(t(LOG_P), t(LP_Q), lp_m, Z0), lp_m)
    lz = math.log(Z0)
    assert close(g, [-math.exp(-0.3 - lz + 1.5) / 3, 0.0, -math.exp(-4.0 - lz + 2.0) / 3])
    assert no_nan(g)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_kl_p_m_keeps_dtype(dtype):
    kl = dm.kl_p_m(t(LOG_P, dtype), t(LP_Q, dtype), t(LP_M, dtype), Z0)
    assert kl.dtype == dtype
    assert kl.item() == pytest.approx(_kl_expected(LOG_P, LP_Q, LP_M, Z0), rel=1e-5)
    kl_inf = dm.kl_p_m(t([-INF, -INF], dtype), t([-1.0, -2.0], dtype), t([-0.5, -0.5], dtype), 0.0)
    assert kl_inf.dtype == dtype and kl_inf.item() == INF


# -----------------------------------------------------------------------------
# tvd_p_m
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("zform", list(Z_FORMS))
def test_tvd_p_m_hand_value_with_P_zero(zform):
    tvd = dm.tvd_p_m(t(LOG_P), t(LP_Q), t(LP_M), Z_FORMS[zform](Z0))
    lz = math.log(Z0)
    expected = 0.5 * (abs(math.exp(-0.3 - lz + 1.5) - math.exp(-0.7 + 1.5))
                      + abs(0.0 - math.exp(-1.2 + 1.0))
                      + abs(math.exp(-4.0 - lz + 2.0) - math.exp(-3.0 + 2.0))) / 3
    assert tvd.dim() == 0 and tvd.dtype == F64
    assert tvd.item() == pytest.approx(expected, rel=REL)


def test_tvd_p_m_is_mean_abs_advantage_over_2Z():
    # paper eq. 21: E_q|A| = 2·Z·TVD(p, π) with A the GDC++ advantage.
    A = dm.dpg_advantage(t(LP_PI), t(LP_Q), t(LOG_P), Z0, baseline=True)
    tvd = dm.tvd_p_m(t(LOG_P), t(LP_Q), t(LP_PI), Z0)
    assert A.abs().mean().item() == pytest.approx(2 * Z0 * tvd.item(), rel=REL)


@pytest.mark.parametrize("Z", [0.0, 0, torch.tensor(0.0, dtype=F64)])
def test_tvd_p_m_Z_zero_is_inf(Z):
    tvd = dm.tvd_p_m(t([-INF, -INF]), t([-1.0, -2.0]), t([-0.5, -0.5]), Z)
    assert tvd.item() == INF and no_nan(tvd)


def test_tvd_p_m_float64_log_ratios_of_700_are_finite():
    tvd = dm.tvd_p_m(t([0.0, 0.0]), t([-700.0, 700.0]), t([-1.0, -2.0]), 1.0)
    assert torch.isfinite(tvd)
    expected = 0.25 * (abs(math.exp(700.0) - math.exp(699.0)) + abs(math.exp(-700.0) - math.exp(-702.0)))
    assert tvd.item() == pytest.approx(expected, rel=REL)


def test_tvd_p_m_weight_past_float64_max_is_finite():
    tvd = dm.tvd_p_m(t([710.0, -INF]), t([0.0, 0.0]), t([709.0, -1.0]), 1.0)
    assert torch.isfinite(tvd)
    expected = 0.5 * ((math.exp(710.0 - math.log(2.0)) - math.exp(709.0 - math.log(2.0)))
                      + math.exp(-1.0) / 2)
    assert tvd.item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_tvd_p_m_keeps_dtype(dtype):
    tvd = dm.tvd_p_m(t(LOG_P, dtype), t(LP_Q, dtype), t(LP_M, dtype), Z0)
    assert tvd.dtype == dtype
    ref = dm.tvd_p_m(t(LOG_P), t(LP_Q), t(LP_M), Z0).item()
    assert tvd.item() == pytest.approx(ref, rel=1e-5)
    tvd_inf = dm.tvd_p_m(t([-INF, -INF], dtype), t([-1.0, -2.0], dtype), t([-0.5, -0.5], dtype), 0.0)
    assert tvd_inf.dtype == dtype and tvd_inf.item() == INF


# -----------------------------------------------------------------------------
# all P = 0: the whole pipeline on a batch where no sample satisfies the constraint
# -----------------------------------------------------------------------------

def test_all_P_zero_batch_gives_no_nan_anywhere():
    log_P = t([-INF, -INF, -INF, -INF])
    lp_q, lp_m = t([-1.0, -2.0, -0.5, -3.0]), t([-1.5, -1.0, -2.0, -2.5])
    lp_pi = t([-1.5, -1.0, -2.0, -2.5], grad=True)
    Zh = dm.estimate_Z(log_P, lp_q)
    assert Zh.item() == 0.0
    for Z in (Zh, 0.0):
        lp_m_g = lp_m.clone().requires_grad_(True)
        kl = dm.kl_p_m(log_P, lp_q, lp_m_g, Z)
        tvd = dm.tvd_p_m(log_P, lp_q, lp_m_g, Z)
        assert kl.item() == INF and tvd.item() == INF
        # The +inf is a constant: its gradient is 0, and no NaN leaks from the masked branch.
        g_kl, g_tvd = (torch.autograd.grad(x, lp_m_g, retain_graph=True)[0] for x in (kl, tvd))
        assert torch.count_nonzero(g_kl) == 0 and torch.count_nonzero(g_tvd) == 0
        assert no_nan(g_kl, g_tvd)
        for baseline in (False, True):
            A = dm.dpg_advantage(lp_pi, lp_q, log_P, Z, baseline)
            assert torch.equal(A, torch.zeros(4, dtype=F64))
            loss = dm.dpg_loss(lp_pi, lp_q, log_P, Z, baseline)
            (g,) = torch.autograd.grad(loss, lp_pi)
            assert loss.item() == 0.0 and torch.count_nonzero(g) == 0 and no_nan(loss, g)


# -----------------------------------------------------------------------------
# kl_reverse
# -----------------------------------------------------------------------------

def test_kl_reverse_hand_value():
    kl = dm.kl_reverse(t([-1.0, -2.5, -0.25]), t([-1.5, -2.0, -3.0]))
    assert kl.dim() == 0
    assert kl.item() == pytest.approx((0.5 - 0.5 + 2.75) / 3, rel=REL)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_kl_reverse_keeps_dtype(dtype):
    assert dm.kl_reverse(t([-1.0, -2.0], dtype), t([-1.5, -1.0], dtype)).dtype == dtype


# -----------------------------------------------------------------------------
# fit_lambdas
# -----------------------------------------------------------------------------

def logit(u):
    return math.log(u / (1 - u))


@pytest.mark.parametrize("mu", [0.3, 0.5, 0.9])
def test_fit_lambdas_one_feature_analytic(mu):
    # N = 2, φ = [1, 0], w = 1: μ̂(λ) = e^λ / (e^λ + 1), so λ = log(μ̄/(1−μ̄)).
    phi, log_w = t([[1.0], [0.0]]), t([0.0, 0.0])
    lam, mu_hat = dm.fit_lambdas(phi, log_w, [mu], tol=1e-13)
    assert lam.shape == (1,) and mu_hat.shape == (1,)
    assert lam.item() == pytest.approx(logit(mu), abs=1e-10)
    assert mu_hat.item() == pytest.approx(mu, abs=1e-13)


def test_fit_lambdas_one_feature_with_weights_analytic():
    # w = (e^a, e^b): μ̂ = e^(a+λ) / (e^(a+λ) + e^b), so λ = logit(μ̄) + b − a.
    a, b, mu = 0.7, -0.4, 0.2
    lam, mu_hat = dm.fit_lambdas(t([[1.0], [0.0]]), t([a, b]), torch.tensor([mu], dtype=F64), tol=1e-13)
    assert lam.item() == pytest.approx(logit(mu) + b - a, abs=1e-10)
    assert mu_hat.item() == pytest.approx(mu, abs=1e-13)


def test_fit_lambdas_two_independent_features_analytic():
    # φ over all of {0,1}² with w = 1: p factorises, so λ_i = logit(μ̄_i).
    phi = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    lam, mu_hat = dm.fit_lambdas(phi, t([0.0] * 4), [0.3, 0.8], tol=1e-13)
    assert close(lam, [logit(0.3), logit(0.8)], rel=1e-10)
    assert close(mu_hat, [0.3, 0.8], rel=1e-12)


@pytest.mark.parametrize("tol", [1e-2, 1e-6, 1e-12])
def test_fit_lambdas_two_features_reach_targets_within_tol(tol):
    phi = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    log_w = t([-0.5, 0.3, -1.2, 0.1])
    mu_bar = t([0.6, 0.25])
    lam, mu_hat = dm.fit_lambdas(phi, log_w, mu_bar, tol=tol)
    assert torch.linalg.vector_norm(mu_bar - mu_hat).item() < tol
    # μ̂ returned is the SNIS moment at the λ returned.
    omega = [math.exp(lw + sum(p * l for p, l in zip(row, lam.tolist())))
             for lw, row in zip(log_w.tolist(), phi.tolist())]
    s = sum(omega)
    expected = [sum(o * row[i] for o, row in zip(omega, phi.tolist())) / s for i in range(2)]
    assert close(mu_hat, expected, rel=1e-12)


def test_fit_lambdas_default_tol_is_0_01():
    phi = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    log_w = t([-0.5, 0.3, -1.2, 0.1])
    mu_bar = t([0.6, 0.25])
    lam, mu_hat = dm.fit_lambdas(phi, log_w, mu_bar)
    assert torch.linalg.vector_norm(mu_bar - mu_hat).item() < 0.01
    # Target exactly 1 with a default tol: stops once ‖μ̄ − μ̂‖ < 0.01, i.e. at μ̂ ∈ (0.99, 1).
    lam1, mu1 = dm.fit_lambdas(t([[1.0], [0.0]]), t([0.0, 0.0]), [1.0])
    assert 0.99 < mu1.item() < 1.0


def test_fit_lambdas_max_iters_zero_returns_lambda_zero_moments():
    # No step: λ = 0 and μ̂ = Σ w φ / Σ w.
    lam, mu_hat = dm.fit_lambdas(t([[1.0], [0.0], [1.0]]), t([0.0, math.log(2.0), math.log(3.0)]),
                                 [0.9], max_iters=0)
    assert lam.tolist() == [0.0]
    assert mu_hat.item() == pytest.approx((1.0 + 3.0) / (1.0 + 2.0 + 3.0), rel=REL)


@pytest.mark.parametrize("tol", [1e-2, 1e-6])
def test_fit_lambdas_target_one_stops_within_tol_with_finite_lambda(tol):
    lam, mu_hat = dm.fit_lambdas(t([[1.0], [0.0]]), t([0.0, 0.0]), [1.0], tol=tol)
    assert torch.isfinite(lam).all() and no_nan(lam, mu_hat)
    assert abs(1.0 - mu_hat.item()) < tol
    assert lam.item() > logit(1.0 - tol)  # μ̂ > 1 − tol ⇔ λ > logit(1 − tol): large, finite


def test_fit_lambdas_target_zero_stops_within_tol_with_finite_lambda():
    lam, mu_hat = dm.fit_lambdas(t([[1.0], [0.0]]), t([0.0, 0.0]), [0.0], tol=1e-6)
    assert torch.isfinite(lam).all()
    assert mu_hat.item() < 1e-6
    assert lam.item() < logit(1e-6)


def test_fit_lambdas_never_firing_feature_raises_with_index():
    phi = t([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match=r"feature 1\b.*never fires"):
        dm.fit_lambdas(phi, t([0.0, 0.0, 0.0]), [0.5, 0.3])
    phi0 = t([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"feature 0\b"):
        dm.fit_lambdas(phi0, t([0.0, 0.0, 0.0]), [0.5, 0.3])


def test_fit_lambdas_always_firing_feature_with_target_below_one_raises():
    phi = t([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"feature 0\b"):
        dm.fit_lambdas(phi, t([0.0, 0.0, 0.0]), [0.5, 0.3])
    # A feature constant at another value names that value.
    phi2 = t([[0.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match=r"feature 1 takes the single value 2"):
        dm.fit_lambdas(phi2, t([0.0, 0.0, 0.0]), [0.5, 1.0])


def test_fit_lambdas_constant_feature_at_its_target_is_fine():
    # A never-firing feature with target 0 and an always-firing one with target 1 are consistent.
    phi = t([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    lam, mu_hat = dm.fit_lambdas(phi, t([0.0, 0.0]), [0.3, 0.0, 1.0], tol=1e-12)
    assert torch.isfinite(lam).all()
    assert close(mu_hat, [0.3, 0.0, 1.0], rel=1e-11)
    assert lam[0].item() == pytest.approx(logit(0.3), abs=1e-9)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_fit_lambdas_keeps_dtype(dtype):
    phi = torch.tensor([[True], [False]])  # any dtype of φ is cast to that of log_w
    lam, mu_hat = dm.fit_lambdas(phi, t([0.0, 0.0], dtype), [0.3], tol=1e-4)
    assert lam.dtype == dtype and mu_hat.dtype == dtype
    assert lam.item() == pytest.approx(logit(0.3), abs=1e-3)
