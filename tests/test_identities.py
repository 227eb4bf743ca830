"""Tier 1: the paper's identities, exact, on random small spaces drawn by Hypothesis.

Each test runs one check of toy_exact.py (which calls the estimators of dpg_min.py) on instances
drawn at random: alphabet size V in 2..4, length T in 1..4, fixed or variable length, random logits
for a, q and π_θ, random energies with P = 0 on part of X, random β > 0. The checks return
max |lhs − rhs| / (1 + |rhs|), which must be at most toy_exact.TOL = 1e-10.
"""
from hypothesis import given
from hypothesis import strategies as st

import toy_exact as tx


@st.composite
def instances(draw, families=("table", "shared"), max_N=400, max_scale=3.0, min_beta=0.05):
    """The arguments of toy_exact.make_instance (a dict, so a failing example prints readably)."""
    V = draw(st.integers(2, 4))
    T = draw(st.integers(1, 4))
    end = draw(st.booleans())
    N = V ** T + (sum(V ** k for k in range(T)) if end else 0)
    if N > max_N:                       # keep the slow checks on the smaller spaces
        T = 1
    return dict(
        V=V, T=T, end=end,
        family=draw(st.sampled_from(families)),
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.floats(0.1, max_scale)),
        zero_frac=draw(st.floats(0.0, 0.9)),
        beta=draw(st.floats(min_beta, 5.0)),
    )


def holds(err):
    return err <= tx.TOL


@given(instances())
def test_policies_sum_to_one(kw):
    """Σ_x π(x) = Σ_x a(x) = Σ_x q(x) = 1 over the enumerated X."""
    assert holds(tx.check_sums_to_one(tx.make_instance(**kw)))


@given(instances())
def test_theorem1_i_reward_is_minus_reverse_kl(kw):
    """E_π R^z_θ = β(log Z_z − D_KL(π_θ‖p_z)) and ∇E_π R^z_θ = −β∇D_KL(π_θ‖p_z), for both
    families."""
    assert holds(tx.check_theorem1_i(tx.make_instance(**kw)))


# An optimisation, not an identity: it depends on conditioning. With r/β of 60 nats p_z has
# probabilities of 1e-26 and the Fisher matrix is singular in float64; so here r/β stays below ~16
# nats (toy_exact.check_theorem1_ii_ascent).
@given(instances(families=("table",), max_N=100, max_scale=2.0, min_beta=0.5))
def test_theorem1_ii_ascent_reaches_p_z(kw):
    """Maximising E_π R^z_π over the per-prefix table gives π = p_z ∝ a·e^{r/β}."""
    assert holds(tx.check_theorem1_ii_ascent(tx.make_instance(**kw)))


@given(instances(families=("table",)))
def test_theorem1_ii_no_distribution_beats_p_z(kw):
    """No random distribution on X has a larger E_π R^z_π than p_z, whose value is β·log Z_z."""
    assert holds(tx.check_theorem1_ii_no_better(tx.make_instance(**kw)))


@given(instances())
def test_footnote3_reward_gradient_term_vanishes(kw):
    """E_π ∇_θ R^z_θ = 0."""
    assert holds(tx.check_footnote3(tx.make_instance(**kw)))


@given(instances())
def test_eqs3_5_dpg_gradient_is_z_times_kl_gradient(kw):
    """E_q ∇dpg_loss (no baseline) = Z·∇_θ D_KL(p‖π_θ)."""
    assert holds(tx.check_eqs3_5(tx.make_instance(**kw)))


@given(instances())
def test_fact1_baseline_is_unbiased_on_policy(kw):
    """q = π: the expected gradient of dpg_loss is the same with and without the baseline Z."""
    assert holds(tx.check_fact1(tx.make_instance(**kw)))


@given(instances())
def test_fact2_baseline_is_unbiased_off_policy(kw):
    """q ≠ π: the expected gradient of dpg_loss is the same with and without the baseline Z·π/q."""
    assert holds(tx.check_fact2(tx.make_instance(**kw)))


@given(instances())
def test_eq13_expected_dpg_reward_is_Z(kw):
    """E_π[P/π] = Z."""
    assert holds(tx.check_eq13(tx.make_instance(**kw)))


@given(instances())
def test_advantage_is_centred_with_baseline(kw):
    """E_q A = 0 for A = P/q − Z·π/q (dpg_advantage)."""
    assert holds(tx.check_advantage_centred(tx.make_instance(**kw)))


@given(instances())
def test_eq21_mean_abs_advantage_is_twice_Z_tvd(kw):
    """E_q|A| = 2·Z·TVD(p, π_θ)."""
    assert holds(tx.check_eq21(tx.make_instance(**kw)))


@given(instances())
def test_variance_identity_for_constant_baselines(kw):
    """Var(G_0) − Var(G_b) = 2b·E[R‖g‖²] − b²·E‖g‖²; b* is optimal; b reduces variance iff
    0 < b < 2b*."""
    assert holds(tx.check_variance_identity(tx.make_instance(**kw)))


@given(instances(families=("table",)))
def test_eq16_fit_lambdas_gives_the_min_kl_projection(kw):
    """fit_lambdas recovers λ exactly; p = a·e^{λ·φ}/Z has moments μ̄ and the least D_KL(·‖a)."""
    assert holds(tx.check_eq16(tx.make_instance(**kw)))


@given(instances(families=("table",)))
def test_hard_factors_meet_their_moments_exactly(kw):
    """μ̄ ∈ {0, 1}: p = a·[φ = μ̄]/Z has E_p φ = μ̄; hybrid: fit_lambdas inside the hard constraint
    hits the soft μ̄."""
    assert holds(tx.check_hard_factors(tx.make_instance(**kw)))


@given(instances(families=("table",)))
def test_kl_forms_gap_and_variance_ordering(kw):
    """gdc's − ours = log Ẑ·(Ẑ_N/Ẑ − 1) for every m; with Ẑ = Z and m = q, gdc's form has the larger
    variance whenever Z ≥ 1; pointwise at π = q = a it has none."""
    assert holds(tx.check_kl_forms(tx.make_instance(**kw)))


@given(instances())
def test_estimate_Z_is_exact_on_all_of_X(kw):
    assert holds(tx.check_estimate_Z(tx.make_instance(**kw)))


@given(instances())
def test_kl_p_m_is_exact_on_all_of_X(kw):
    assert holds(tx.check_kl_p_m(tx.make_instance(**kw)))


@given(instances())
def test_tvd_p_m_is_exact_on_all_of_X(kw):
    assert holds(tx.check_tvd_p_m(tx.make_instance(**kw)))


@given(instances())
def test_kl_reverse_is_exact_on_all_of_X(kw):
    assert holds(tx.check_kl_reverse(tx.make_instance(**kw)))


def test_z_window_is_reported_not_assumed():
    """Z is not the optimal constant baseline (paper, footnote 5): it may or may not reduce the
    variance. The report must be a real fraction computed from b*, not a constant."""
    results = [tx.z_in_window(tx.make_instance(V=2, T=3, seed=s, scale=2.0)) for s in range(6)]
    for hit, ratio in results:
        assert hit == (0 < ratio < 2)


def test_toy_exact_script_prints_every_identity_passing(capsys):
    """`python toy_exact.py` (its main, in-process) prints one row per identity, and every row
    passes."""
    assert tx.main([]) == 0
    stdout = capsys.readouterr().out
    rows = [line for line in stdout.splitlines()
            if line.rstrip().endswith("s") and " pass " in line]
    assert len(rows) == len(tx.CHECKS)
    assert f"{len(tx.CHECKS)}/{len(tx.CHECKS)} identities hold" in stdout
