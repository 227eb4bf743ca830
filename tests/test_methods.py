"""Issue 4: Ziegler's PPO pieces, the variance diagnostics, and the sentiment tasks' plumbing."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dpg_min as dm
from test_train import read_metrics, run, small_config

# -- Ziegler: the pure functions ----------------------------------------------------------------


@given(st.integers(1, 5), st.integers(1, 6), st.floats(0.01, 10), st.integers(0, 2**31 - 1))
def test_per_token_kl_penalties_sum_to_the_sequence_kl_control_reward(B, T, beta, seed):
    g = torch.Generator().manual_seed(seed)
    logp_pi, logp_a = -3 * torch.rand(B, T, generator=g), -3 * torch.rand(B, T, generator=g)
    R = torch.randint(0, 2, (B,), generator=g).float()
    r = dm.kl_penalty_rewards(logp_pi, logp_a, R, beta)
    assert r.shape == (B, T)
    expected = dm.kl_control_reward(R, logp_pi.sum(1), logp_a.sum(1), beta)
    assert torch.allclose(r.sum(1), expected, atol=1e-5)
    assert torch.allclose(r[:, :-1], -beta * (logp_pi - logp_a)[:, :-1])   # the score only at the end


@given(st.integers(1, 4), st.integers(1, 7), st.floats(0.5, 1), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_gae_equals_the_plain_sum_of_discounted_td_errors(B, T, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    r, V = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    A, returns = dm.gae(r, V, gamma, lam)
    V_next = torch.cat([V[:, 1:], torch.zeros(B, 1, dtype=V.dtype)], dim=1)
    delta = r + gamma * V_next - V
    for b in range(B):
        for t in range(T):
            expected = sum((gamma * lam) ** k * delta[b, t + k] for k in range(T - t))
            assert A[b, t].item() == pytest.approx(expected.item(), abs=1e-10)
    assert torch.allclose(returns, A + V)
    # γ = λ = 1: the return is the plain sum of the rewards still to come, whatever V is
    A1, ret1 = dm.gae(r, V, 1.0, 1.0)
    assert torch.allclose(ret1, r.flip(1).cumsum(1).flip(1))


def test_ppo_loss_clips_the_ratio_and_the_value_change():
    logp_old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))                    # ratios 1.5 and 0.5
    A = torch.tensor([[1.0, -1.0]])
    zero = torch.zeros(1, 2)
    loss, ratio = dm.ppo_loss(logp, logp_old, A, zero, zero, zero, clip=0.2, vf_coef=0.0)
    assert torch.allclose(ratio, torch.tensor([[1.5, 0.5]]))
    # −A·ρ vs −A·clip(ρ): for A = 1, max(−1.5, −1.2) = −1.2; for A = −1, max(0.5, 0.8) = 0.8
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    V, V_old, returns = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    loss, _ = dm.ppo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), V, V_old, returns,
                          clip=0.2, vf_coef=1.0)
    # unclipped (1 − 2)² = 1, clipped (0.2 − 2)² = 3.24: the larger one, halved
    assert loss.item() == pytest.approx(0.5 * 3.24)


def test_adaptive_beta_moves_toward_its_kl_target():
    assert dm.adaptive_beta(0.2, kl=12.0, target=6, horizon=10000, n=256) > 0.2     # too far from a: more β
    assert dm.adaptive_beta(0.2, kl=1.0, target=6, horizon=10000, n=256) < 0.2      # too close: less β
    assert dm.adaptive_beta(0.2, kl=6.0, target=6, horizon=10000, n=256) == 0.2
    # the relative change is clipped at ±0.2·n/horizon
    assert dm.adaptive_beta(1.0, kl=600.0, target=6, horizon=100, n=10) == pytest.approx(1.02)
    assert dm.adaptive_beta(1.0, kl=0.0, target=6, horizon=100, n=10) == pytest.approx(0.98)


def test_ppo_ratio_is_one_on_the_first_minibatch_and_moves_after():
    """π_old is π at the start of the update, so the first minibatch of the first epoch has ρ = 1."""
    a, _ = dm.load_lm("tiny")
    pi = dm.build_tiny(dm.tiny_vocab())[0].requires_grad_(True)
    v_head = torch.nn.Linear(pi.config.hidden_size, 1)
    torch.manual_seed(0)
    ids, _ = dm.sample(pi, 32, 6, bos_id=0)
    R = torch.randint(0, 2, (32,)).double()
    logp_old, V_old, A, returns, kl = dm.ppo_rollout(pi, v_head, a, ids, R, 0.2, 16)
    assert abs(kl) < 1e-5                                            # π = a, so the penalties are 0
    cfg = dm.Config(ppo_epochs=2, ppo_minibatch=8)
    optimizer = torch.optim.Adam(list(pi.parameters()) + list(v_head.parameters()), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ratios = dm.ppo_update(pi, v_head, ids, logp_old, V_old, A, returns, cfg, optimizer, scheduler)
    assert len(ratios) == 2 * 32 // 8 and optimizer.state                         # one step per minibatch
    assert torch.allclose(ratios[0], torch.ones_like(ratios[0]), atol=1e-5)
    assert (ratios[-1] - 1).abs().max() > 1e-3


# -- the methods end to end --------------------------------------------------------------------


def test_ziegler_on_tiny_raises_E_phi_and_adapts_beta(tmp_path):
    """PPO with the KL penalty on `amazing`: E_π φ rises, and β falls while KL(π‖a) is under target."""
    cfg = small_config(tmp_path, method="ziegler", batch_size=128, forward_batch_size=64, steps=30,
                       eval_interval=30, eval_samples=256, q_update_interval=10)
    lines = []
    run(cfg, log=lines.append)
    first, final = read_metrics(cfg.out)
    assert lines[0].startswith("Ziegler on")
    assert final["E_pi_phi"][0] > 2 * first["E_pi_phi"][0] + 0.03 and final["q_updates"] == 0
    assert first["beta"] == 0.2 and final["beta"] < 0.2 and final["kl_pi_a"] < cfg.kl_target
    assert final["mean_abs_A"] > 0 and final["var_A"] > 0


@pytest.mark.parametrize("method, baseline", [("dpg", False), ("dpg", True), ("reinforce", True),
                                              ("ziegler", False)])
def test_every_method_logs_the_same_metrics_with_var_G_on_request(tmp_path, method, baseline):
    cfg = small_config(tmp_path, method=method, baseline=baseline, steps=2, eval_interval=2,
                       grad_var_interval=2, grad_var_samples=4)
    run(cfg)
    first, final = read_metrics(cfg.out)
    assert set(first) == set(final) == set(read_metrics(cfg.out)[0])
    assert final["var_G"] > 0 and final["var_A"] >= 0 and 0 < final["ess_P_q"] <= 1
    assert first["var_G"] is None and first["mean_abs_A"] is None        # nothing trained at step 0


# -- variance diagnostics ----------------------------------------------------------------------


def test_grad_variance_equals_a_brute_force_computation_from_stacked_gradients():
    """Var(G) by running sums (eq. 18) = E‖G − μ(G)‖² from every per-sample gradient stacked (eq. 17)."""
    pi, _ = dm.load_lm("tiny")
    pi.requires_grad_(True)
    torch.manual_seed(1)
    ids, logp_q = dm.sample(pi, 6, 5, bos_id=0)
    log_P = torch.where(torch.arange(6) % 2 == 0, logp_q, torch.tensor(-math.inf, dtype=torch.float64))
    Z = 0.3

    def loss_of(j):
        return dm.dpg_loss(dm.sequence_logprob(pi, ids[j:j + 1]), logp_q[j:j + 1], log_P[j:j + 1], Z, True)

    params = [p for p in pi.parameters()]
    G = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss_of(j), params)]).double()
                     for j in range(6)])
    brute = ((G - G.mean(0)) ** 2).sum(1).mean().item()
    assert brute > 0 and dm.grad_variance(pi.parameters(), loss_of, 6) == pytest.approx(brute, rel=1e-6)


def test_ess_of_importance_weights():
    assert dm.ess(torch.zeros(10, dtype=torch.float64)) == pytest.approx(10)
    assert dm.ess(torch.tensor([0.0, -1000.0, -1000.0], dtype=torch.float64)) == pytest.approx(1)
    assert dm.ess(torch.tensor([1000.0, 1000.0, -math.inf], dtype=torch.float64)) == pytest.approx(2)
    assert dm.ess(torch.full((4,), -math.inf, dtype=torch.float64)) == 0.0    # P = 0 everywhere


# -- sentiment tasks 5 and 6 --------------------------------------------------------------------


@pytest.fixture
def tiny_classifier(tmp_path):
    """A random tiny classifier saved to a folder, as a downloaded one would be: it checks plumbing,
    not sentiment."""
    model, tokenizer = dm.build_tiny(dm.tiny_vocab(), seed=3, labels=("NEGATIVE", "POSITIVE"))
    path = tmp_path / "classifier"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_sentiment_features_from_a_saved_classifier(tiny_classifier):
    model, tokenizer = dm.load_classifier(tiny_classifier, "cpu")
    a, lm_tokenizer = dm.load_lm("tiny")
    torch.manual_seed(0)
    ids, _ = dm.sample(a, 70, 12, bos_id=0)
    texts = lm_tokenizer.batch_decode(ids[:, 1:].tolist())
    phi = dm.phi_matrix(["sentiment:positive", "sentiment:negative", "word:amazing"], texts,
                        classifier=(model, tokenizer))
    assert phi.shape == (70, 3) and torch.equal(phi[:, 0] + phi[:, 1], torch.ones(70))   # two labels
    assert 0 < phi[:, 0].mean() < 1                                 # the random model says both
    # batching changes nothing: 70 texts in batches of 32 (with padding) = one at a time
    one_by_one = dm.classify((model, tokenizer), texts, "positive", batch_size=1)
    assert torch.equal(phi[:, 0], one_by_one)
    with torch.no_grad():                                            # and it is the argmax label
        logits = model(**tokenizer(texts[:1], return_tensors="pt")).logits
    assert phi[0, 0].item() == float(model.config.id2label[logits.argmax().item()] == "POSITIVE")


def test_sentiment_labels_are_mapped_by_name_not_by_index(tmp_path, tiny_classifier):
    model, tokenizer = dm.load_classifier(tiny_classifier, "cpu")
    swapped = dm.build_tiny(dm.tiny_vocab(), seed=3, labels=("POSITIVE", "NEGATIVE"))[0]
    texts = ["amazing she", "the team won", "baba babe", "art"]
    assert torch.equal(dm.classify((model, tokenizer), texts, "positive"),
                       dm.classify((swapped, tokenizer), texts, "negative"))
    other = dm.build_tiny(dm.tiny_vocab(), labels=("SPAM", "HAM"))
    other[0].save_pretrained(tmp_path / "spam")
    other[1].save_pretrained(tmp_path / "spam")
    with pytest.raises(dm.BadInput, match="none named positive and negative"):
        dm.load_classifier(str(tmp_path / "spam"), "cpu")


@pytest.mark.parametrize("method", ["dpg", "reinforce"])
def test_sentiment_task_trains_with_a_classifier_from_a_folder(tmp_path, tiny_classifier, method):
    cfg = small_config(tmp_path, task="negative", classifier=tiny_classifier, method=method, baseline=True,
                       steps=2, eval_interval=2)
    run(cfg)
    final = read_metrics(cfg.out)[-1]
    assert final["step"] == 2 and 0 <= final["E_pi_phi"][0] <= 1 and final["Z_hat"] > 0
