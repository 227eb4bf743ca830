"""dpg_min: GDC++ (KL-adaptive DPG with a baseline) in one readable file.

Korbak, Elsahar, Kruszewski, Dymetman. "On Reinforcement Learning and Distribution Matching for
Fine-Tuning Language Models with no Catastrophic Forgetting". NeurIPS 2022.

    python dpg_min.py --task amazing --baseline               # the paper's setting: GPT-2, a GPU advised
    python dpg_min.py --task amazing --baseline --model tiny  # offline, on a laptop CPU, in 2 minutes
    python dpg_min.py --help                                  # every option, with its source

The idea in two lines. Distribution matching (DM) first writes down the distribution we want,
p(x) = P(x)/Z with an energy-based model P(x) = a(x)·exp(λ·φ(x)) built on the original LM a, and then
trains a policy π_θ to minimise D_KL(p‖π_θ) with Distributional Policy Gradients (DPG). GDC++ subtracts
the baseline Z·π_θ(x)/q(x) from DPG's importance weight P(x)/q(x), which adds no bias (Facts 1, 2)
and centres the advantage around zero (paper Fig. 2).

The file reads like the paper: Config, the math (pure functions of log-prob tensors), LM plumbing,
tasks, evaluation, one training loop (Algorithm 1, and the comparison methods Reinforce and Ziegler),
the command line. `toy_exact.py` imports the math and checks it against exact sums over small sequence
spaces, so what trains is what is verified. README.md maps each equation of the paper to its function.
"""

import argparse
import copy
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Config: the paper's setting for GPT-2 (gdc_spec §5 collects it from naver/gdc's GDC++ configs).
# Every field becomes a command-line flag: `batch_size` is `--batch-size`.
# -----------------------------------------------------------------------------


def arg(default, help):
    """A Config field with its --help text, which names where the default comes from."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # task
    task: str = arg("amazing", "a task of paper §4.2: amazing, wikileaks, politics, science, female, topics, "
                             "hybrid-sports, hybrid-politics")
    word: str = arg("", "custom constraint: the word W must occur (case-sensitive); replaces --task")
    wordlist: str = arg("", "custom constraint: a file of words, one per line, one must occur; replaces --task")
    moments: str = arg("", "target moments μ̄, comma-separated, one per feature (default: the task's)")
    # method
    classifier: str = arg("distilbert/distilbert-base-uncased-finetuned-sst-2-english",
                          "tasks positive and negative: an HF text classifier (name or path) with labels named "
                          "POSITIVE/NEGATIVE, or tiny (random, built in code: for plumbing only)")
    method: str = arg("dpg", "dpg: KL-adaptive DPG (Algorithm 1); reinforce: REINFORCE with R = φ (eq. 1); "
                             "ziegler: KL-control (eq. 2) by PPO (Ziegler et al. 2019). RL methods: pointwise tasks")
    baseline: bool = arg(False, "with a baseline: for dpg, GDC++ (Z·π/q, Algorithm 1 line 5; without it, GDC); "
                                "for reinforce, the batch-mean reward (eq. 12); ziegler always has one (its value head)")
    # model and sampling
    model: str = arg("gpt2", "a: HF name or local path (paper: gpt2, 117M), or tiny (offline, built in code)")
    seq_len: int = arg(40, "T, tokens sampled after BOS (gdc_spec §5: txt_out_len 40)")
    # optimisation
    batch_size: int = arg(512, "B, samples per gradient step (gdc_spec §5)")
    forward_batch_size: int = arg(32, "samples per forward pass; only memory depends on it (gdc_spec §5: 32)")
    samples: int = arg(None, "training samples in all (gdc_spec §5: 6.4M for pointwise tasks, else 8.4M)")
    steps: int = arg(None, "gradient steps; overrides --samples")
    lr: float = arg(1.41e-5, "Adam learning rate (gdc_spec §5)")
    warmup: int = arg(100, "steps of linear learning-rate warm-up, then constant (gdc_spec §5)")
    q_update_interval: int = arg(10, "K: every K steps, estimate Z on K·B fresh samples of q and maybe "
                                     "set q ← π (Algorithm 1; gdc_spec §1.3)")
    ppo_epochs: int = arg(1, "ziegler: passes over each batch (gdc_spec §1.5: PPO.json)")
    ppo_minibatch: int = arg(32, "ziegler: samples per PPO minibatch, one Adam step each (gdc_spec §1.5)")
    kl_beta: float = arg(0.2, "ziegler: initial KL coefficient β (gdc_spec §1.5)")
    kl_target: float = arg(6.0, "ziegler: β adapts so that KL(π‖a) of a batch nears this many nats (gdc_spec §1.5)")
    kl_horizon: int = arg(10000, "ziegler: β's adaptation horizon, in samples (gdc_spec §1.5)")
    lambda_samples: int = arg(10240, "samples of a to fit λ of a distributional task (gdc_spec §2)")
    lambda_tol: float = arg(0.01, "fit λ until ‖μ̄ − μ̂‖₂ < this (gdc_spec §2)")
    # evaluation and output
    eval_interval: int = arg(10, "evaluate π every this many steps (gdc_spec §5)")
    eval_samples: int = arg(2048, "samples of π per evaluation (gdc_spec §5)")
    diversity_samples: int = arg(500, "Distinct-n and Self-BLEU-n on the first this many evaluation samples; "
                                      "Self-BLEU's cost is quadratic in them (gdc_spec §3: 500)")
    grad_var_interval: int = arg(0, "every this many steps, Var(G) from per-sample gradients (§4.5, eqs. 17-18; "
                                    "one backward pass per sample); 0: never")
    grad_var_samples: int = arg(64, "samples of the batch for Var(G) (gdc_spec §3: minibatches of 64)")
    seed: int = arg(12, "random seed (gdc_spec §5)")
    out: str = arg("", "output directory, must be new or empty (default: a new runs/TASK-METHOD-MODEL-DATE-TIME)")
    save_interval: int = arg(100, "write a checkpoint OUT/checkpoint-STEP every this many steps and at the end; "
                                  "only the latest is kept")
    resume: str = arg("", "continue the run in this folder from its last checkpoint; only --steps, --samples, "
                          "--lr, --device and --save-interval may differ from the run's own flags")
    overwrite: bool = arg(False, "replace the earlier run in a non-empty --out")
    device: str = arg("", "cuda or cpu (default: cuda when available)")


# `--model tiny` presets, measured on 2 CPU cores (README "Quick start"); flags still override them.
# A random tiny model is far from GPT-2, so it wants a larger learning rate and far fewer samples.
TINY = dict(seq_len=20, batch_size=128, forward_batch_size=128, steps=240, lr=1e-3, warmup=0,
            eval_interval=20, eval_samples=1024, lambda_samples=4096, diversity_samples=100, classifier="tiny")


class BadInput(Exception):
    """A user error: `main` prints it as one line and exits with status 2."""


def refuse(message):
    """argparse's `error`, replaced: one line and exit 2 (through `main`), not the usage text."""
    raise BadInput(message)


class NotFinite(Exception):
    """Training met a NaN or ±inf before an update (`check_finite`): `main` prints it and exits with 1."""


# -----------------------------------------------------------------------------
# Math: losses and estimators
#
# Conventions. For a sequence x:
#   logp_pi = log π_θ(x)   the policy being trained (the only tensor that carries gradient)
#   logp_q  = log q(x)     the proposal that x was sampled from (Algorithm 1)
#   logp_a  = log a(x)     the original, frozen LM
#   log_P   = log P(x)     the unnormalised target (EBM); −inf where P(x) = 0 (a hard constraint)
#   Z       = Σ_x P(x)     the partition function, a non-negative number (float or 0-dim tensor)
#
# Everything is formed in log space and exponentiated as late as possible: a sequence log-prob is
# a sum of T token log-probs, so log-ratios of a few hundred nats are ordinary, and exp of them
# overflows float32 (near 88) long before float64 (near 709).
# -----------------------------------------------------------------------------


def _as_scalar(Z, like):
    """Z as a detached 0-dim tensor with the dtype and device of `like` (Z may be a Python float)."""
    return torch.as_tensor(Z, dtype=like.dtype, device=like.device).detach()


def _log_p(log_P, Z):
    """log p(x) = log P(x) − log Z, keeping P = 0 at exactly −inf.

    Note: the plain subtraction would give −inf − (−inf) = NaN when Z = 0 as well; a sample with
    P(x) = 0 has p(x) = 0 whatever Z is, so we keep it at −inf.
    """
    log_Z = torch.log(_as_scalar(Z, log_P))
    return torch.where(log_P == -math.inf, log_P, log_P - log_Z)


def dpg_advantage(logp_pi, logp_q, log_P, Z, baseline):
    """The (detached) DPG advantage of each sample x ~ q.

        GDC   (baseline=False):  A(x) = P(x)/q(x)                       (eq. 5, made off-policy)
        GDC++ (baseline=True):   A(x) = P(x)/q(x) − Z·π_θ(x)/q(x)       (Algorithm 1, line 5; eq. 15)

    Paper: B^off(x) = Z·π_θ(x)/q(x) is the off-policy form of the baseline B = Z = E_π[P/π]
    (eq. 13); it adds no bias (Fact 2) because E_q[(π/q)·∇log π] = Σ_x ∇π(x) = 0.
    Note: π/q in the baseline is detached, as in naver/gdc (gdc/gdc.py L693): the baseline is a
    fixed number per sample, and only the factor ∇log π of the estimator carries gradient.
    Both terms are exp of a log-ratio, so P = 0 (log_P = −inf) gives exactly 0 and Z = 0 gives no
    baseline (log 0 = −inf), with no 0·inf anywhere.
    """
    logp_pi, logp_q, log_P = logp_pi.detach(), logp_q.detach(), log_P.detach()
    A = torch.exp(log_P - logp_q)                                   # P/q, the DPG "reward"
    if baseline:
        log_Z = torch.log(_as_scalar(Z, logp_q))
        A = A - torch.exp(log_Z + logp_pi - logp_q)                 # − Z·π/q
    return A


def dpg_loss(logp_pi, logp_q, log_P, Z, baseline):
    """A scalar whose gradient is the DPG / GDC++ gradient estimate on a batch x_1..x_B ~ q:

        ∇loss = −(1/B) Σ_i A(x_i) ∇_θ log π_θ(x_i)

    Paper (eqs. 3-5): E_q[(P/q)·∇log π] = Σ_x P(x)∇log π(x) = −Z·∇D_KL(p‖π_θ), so descending this loss
    descends D_KL(p‖π_θ) (scaled by the unknown constant Z). With baseline=True it is Algorithm 1, line 5.
    Note: the loss value itself means nothing (Spinning Up's remark on policy-gradient losses); only its
    gradient does. A is detached, so gradient flows only through `logp_pi`, a sum of token log-probs
    (a sum, not a mean: the estimator is for the log-prob of the whole sequence).
    """
    A = dpg_advantage(logp_pi, logp_q, log_P, Z, baseline)
    return -(A * logp_pi).mean()


def kl_control_reward(r, logp_pi, logp_a, beta):
    """The KL-control reward of Ziegler et al. 2019 (paper eq. 2):

        R^z_θ(x) = r(x) − β·log(π_θ(x)/a(x))

    Paper (Theorem 1): E_π R^z_θ = β·(log Z_z − D_KL(π_θ‖p_z)) with p_z ∝ a·e^{r/β} (eqs. 9-10), so
    maximising this reward is distribution matching with the reverse KL. The reward depends on θ, but
    its reward-gradient term vanishes in expectation (footnote 3): E_π ∇_θ R^z_θ = −β·E_π ∇log π = 0.
    Not detached: a caller who wants a fixed reward detaches it (the tests differentiate through it).
    """
    return r - beta * (logp_pi - logp_a)


def reinforce_loss(logp_pi, reward):
    """A scalar whose gradient is the REINFORCE estimate (paper eq. 1) on a batch x_1..x_B ~ π_θ:

        ∇loss = −(1/B) Σ_i R(x_i) ∇_θ log π_θ(x_i),   E_π[R ∇log π] = ∇E_π R.

    The reward is detached: it is a fixed number per sample, whatever produced it.
    """
    return -(reward.detach() * logp_pi).mean()


def kl_penalty_rewards(logp_pi_t, logp_a_t, R, beta):
    """Ziegler et al.'s per-token rewards (B, T): the KL-control reward of eq. 2 spread over the tokens,

        r_t = −β·(log π(y_t | y_<t) − log a(y_t | y_<t)),   plus R(x) at the last token t = T,

    so that Σ_t r_t = R(x) − β·log(π(x)/a(x)) = R^z(x) (`kl_control_reward`): PPO gets a KL signal at
    every token and the task's score once, at the end (gdc_spec §1.5). Inputs are token log-probs (B, T).
    """
    r = -beta * (logp_pi_t - logp_a_t).detach()
    return torch.cat([r[:, :-1], r[:, -1:] + R.detach().to(r.dtype)[:, None]], dim=1)


def gae(r, V, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016) on per-token rewards r and values V (B, T):

        δ_t = r_t + γ·V_{t+1} − V_t  (V_{T+1} = 0: the episode ends),   A_t = Σ_{k≥0} (γλ)^k·δ_{t+k},

    computed backwards as A_t = δ_t + γλ·A_{t+1}. Returns (A, A + V); A + V is the value target.
    γ = 1, λ = 0.95 as in Ziegler et al. 2019 and naver/gdc (gdc_spec §1.5).
    """
    A, next_A = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    next_V = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        next_A = r[:, t] + gamma * next_V - V[:, t] + gamma * lam * next_A
        A[:, t], next_V = next_A, V[:, t]
    return A, A + V


def ppo_loss(logp, logp_old, A, V, V_old, returns, clip=0.2, vf_coef=0.1):
    """The PPO-clip loss with a clipped value loss (Schulman et al. 2017; gdc_spec §1.5), per token (B, T):

        ρ_t = π(y_t|·)/π_old(y_t|·),   L^π = E_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 ± ε)),
        L^V = ½·E_t max((V_t − G_t)², (V_old,t + clip(V_t − V_old,t, ±ε) − G_t)²),   loss = L^π + c·L^V.

    G_t are the value targets (`returns`, from `gae`). The clips keep each update near the policy that
    sampled the batch. Returns (loss, ρ).
    """
    ratio = torch.exp(logp - logp_old.detach())
    A = A.detach()
    policy = torch.max(-A * ratio, -A * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    V_clipped = V_old + torch.clamp(V - V_old, -clip, clip)
    value = 0.5 * torch.max((V - returns) ** 2, (V_clipped - returns) ** 2).mean()
    return policy + vf_coef * value, ratio


def adaptive_beta(beta, kl, target, horizon, n):
    """Ziegler et al.'s adaptive KL coefficient, after a batch of n samples whose mean log(π/a) is kl:

        β ← β·(1 + clip(kl/target − 1, −0.2, 0.2)·n/horizon)

    β grows when π drifts further from a than the target number of nats, and shrinks when it stays
    closer (gdc_spec §1.5: β₀ = 0.2, target 6, horizon 10000).
    """
    return beta * (1 + min(max(kl / target - 1, -0.2), 0.2) * n / horizon)


def ess(log_w):
    """Effective sample size (Σw)²/Σw² (Kish) of importance weights w = exp(log_w): N when all are equal,
    1 when a single weight dominates, 0 when all are 0 (no sample has P > 0). In log space."""
    if torch.all(log_w == -math.inf):
        return 0.0
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)).item()


def grad_variance(params, loss_of, n):
    """Var(G) = E‖G(x)‖² − ‖E G(x)‖² (paper eqs. 17-18) over n samples, from per-sample gradients.

    `loss_of(j)` is the loss of sample j alone, whose gradient is G(x_j) up to sign (for DPG,
    −A(x_j)·log π(x_j)). One backward pass per sample, keeping only the running Σ G and Σ ‖G‖²: the
    memory of two gradients, whatever n is. Opt-in (`--grad-var-interval`): it costs n backward passes.
    """
    params = [p for p in params if p.requires_grad]
    total, sq = None, 0.0
    for j in range(n):
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss_of(j), params)]).double()
        total = g if total is None else total + g
        sq += (g @ g).item()
    return sq / n - (total @ total).item() / n ** 2


def estimate_Z(log_P, logp_q):
    """Importance-sampling estimate of the partition function from x_1..x_N ~ q (paper eq. 13):

        Ẑ = (1/N) Σ_i P(x_i)/q(x_i),   unbiased: E_q[P/q] = Σ_x P(x) = Z.

    Computed as exp(logsumexp(log P − log q) − log N), so no single weight is ever exponentiated on
    its own; all P = 0 gives exactly 0.
    """
    log_w = log_P - logp_q
    return torch.exp(torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0]))


def kl_p_m(log_P, logp_q, logp_m, Z):
    """Importance-sampling estimate of D_KL(p‖m), p = P/Z, from x_1..x_N ~ q (paper §4.2, metric 2):

        D_KL(p‖m) = E_p[log p − log m] = E_q[(p/q)·(log p − log m)]
                  ≈ (1/N) Σ_i (p(x_i)/q(x_i))·(log p(x_i) − log m(x_i)).

    A sample with P = 0 contributes 0 (the limit of u·log u at 0), never NaN. Z = 0 (no sample has
    P > 0, so p is unknown) gives +inf. The 1/N is folded into the exponent, so N weights of e^700
    sum without overflow in float64.
    Note: naver/gdc writes the same estimator as −log Ẑ + (1/Ẑ)·mean[w·(log P − log m)]
    (gdc/base_trainer.py L84-242).
    """
    log_p = _log_p(log_P, Z)
    weight = torch.exp(log_p - logp_q - math.log(log_p.shape[0]))   # p/(N·q)
    terms = torch.where(log_p == -math.inf, torch.zeros_like(weight), weight * (log_p - logp_m))
    return torch.where(_as_scalar(Z, log_P) > 0, terms.sum(), math.inf)


def tvd_p_m(log_P, logp_q, logp_m, Z):
    """Importance-sampling estimate of the total variation distance TVD(p, m) from x_1..x_N ~ q:

        TVD(p, m) = ½ Σ_x |p(x) − m(x)| = ½·E_q |p/q − m/q|      (paper eq. 21)

    With m = π_θ, Z·(p/q − π/q) is the GDC++ advantage, so E_q|A| = 2·Z·TVD(p, π): the mean absolute
    advantage measures how far π still is from p (paper §4.5). Z = 0 gives +inf.
    """
    log_p = _log_p(log_P, Z)
    log_N = math.log(log_p.shape[0])
    terms = torch.abs(torch.exp(log_p - logp_q - log_N) - torch.exp(logp_m - logp_q - log_N))
    return torch.where(_as_scalar(Z, log_P) > 0, 0.5 * terms.sum(), math.inf)


def kl_reverse(logp_m, logp_a):
    """Monte-Carlo estimate of D_KL(m‖a) from x_1..x_N ~ m (paper §4.2, metric 3):

        D_KL(m‖a) = E_m[log m − log a] ≈ (1/N) Σ_i (log m(x_i) − log a(x_i)).

    Exact ancestral samples of m are required: samples from a truncated sampler (top-k, top-p)
    come from another distribution and make this estimate meaningless.
    """
    return (logp_m - logp_a).mean()


def fit_lambdas(phi, log_w, mu_bar, tol=1e-2, max_iters=1000):
    """Find λ so that P(x) = a(x)·exp(λ·φ(x)) has the target moments E_p φ = μ̄ (paper §4.1, eq. 16).

    Inputs: φ (N×k) of N samples x_j ~ q, log w_j = log a(x_j) − log q(x_j), the targets μ̄ (k,).
    The moments of p are estimated by self-normalised importance sampling (SNIS, Owen 2013):

        μ̂(λ) = Σ_j ω_j φ(x_j),   ω = softmax(log w + φ·λ).

    Among all distributions with E φ = μ̄ this exponential family member has the least D_KL(·‖a)
    (Csiszár's I-projection; Khalifa et al. 2021), and its λ maximises the concave dual

        g(λ) = λ·μ̄ − log Σ_j w_j·exp(λ·φ_j),   ∇g = μ̄ − μ̂(λ),   ∇²g = −Cov_ω(φ).

    Note: naver/gdc takes plain gradient steps λ ← λ + 0.5·(μ̄ − μ̂) from λ = 0 until ‖μ̄ − μ̂‖₂ < 0.01
    or 1000 steps (gdc/gdc.py L526-606). We take Newton steps on g, with backtracking so that every
    step increases g: the same λ, in a handful of steps, and to machine precision when tol asks for it.
    A target of exactly 1 (or 0) needs λ = ±inf; we stop, as naver/gdc does, once within tol.

    Returns (λ, μ̂(λ)). The caller decides what to do if ‖μ̄ − μ̂‖₂ is still ≥ tol after max_iters.
    """
    phi = phi.to(log_w.dtype)
    mu_bar = torch.as_tensor(mu_bar, dtype=log_w.dtype, device=log_w.device).reshape(-1)
    assert phi.dim() == 2 and phi.shape == (log_w.shape[0], mu_bar.shape[0]), \
        f"phi must be (N, k) = ({log_w.shape[0]}, {mu_bar.shape[0]}), got {tuple(phi.shape)}"
    # A moment can only be moved between the smallest and largest value the feature takes in the
    # sample. A feature that never fires has μ̂ = 0 for every λ: say so instead of diverging to NaN.
    for i in range(phi.shape[1]):
        lo, hi = phi[:, i].min().item(), phi[:, i].max().item()
        if lo == hi and mu_bar[i].item() != lo:
            what = "never fires" if hi == 0 else f"takes the single value {hi:g}"
            raise ValueError(f"feature {i} {what} in the {phi.shape[0]} samples, so its moment cannot "
                             f"reach {mu_bar[i].item():g}: draw more samples or change the target")

    def dual(lam):
        return lam @ mu_bar - torch.logsumexp(log_w + phi @ lam, dim=0)

    lam = torch.zeros_like(mu_bar)
    for _ in range(max_iters):
        omega = torch.softmax(log_w + phi @ lam, dim=0)            # (N,) SNIS weights
        mu_hat = omega @ phi                                        # (k,)
        grad = mu_bar - mu_hat
        if torch.linalg.vector_norm(grad) < tol:
            break
        centred = phi - mu_hat
        cov = centred.T @ (omega[:, None] * centred)               # (k, k), PSD
        step = torch.linalg.pinv(cov) @ grad                        # Newton direction, an ascent one
        if not bool(step @ grad > 0):
            step = grad                                             # flat directions: plain gradient
        # Backtrack until g does not fall. Near the top g changes by δ² for a step δ, below rounding,
        # so "does not fall" allows for a few ulps of noise instead of halving the step for nothing.
        g0, t = dual(lam), 1.0
        slack = 64 * torch.finfo(g0.dtype).eps * (1 + g0.abs())
        while dual(lam + t * step) < g0 - slack and t > 1e-12:
            t /= 2
        lam = lam + t * step
    omega = torch.softmax(log_w + phi @ lam, dim=0)
    return lam, omega @ phi


# -----------------------------------------------------------------------------
# LM plumbing: exact ancestral sampling and sequence log-probs
#
# A sequence is the BOS token followed by T generated tokens, ids of shape (B, T + 1). BOS is only
# conditioning: log m(x) = Σ_{t=1..T} log m(y_t | BOS, y_<t), a sum over the T generated tokens
# (gdc_spec §1.0). Every sequence has exactly T tokens; an EOS token sampled on the way is just a
# token, as in naver/gdc, so all models score the same T positions. Sequence log-probs are summed in
# float64: the estimators exponentiate differences of them, and exp overflows float32 at 88 nats.
# -----------------------------------------------------------------------------


@torch.no_grad()
def sample(model, n, T, bos_id, batch_size=256):
    """n exact ancestral samples of T tokens from `model`, with their log-probs.

    Returns ids (n, T + 1), starting with BOS, and logp (n,) = Σ_t log m(y_t | y_<t).
    Note: we do not call `generate`. In transformers v5 `do_sample=True` silently applies top-k = 50,
    and EOS ends a sequence early or, with min_new_tokens, is forbidden; each of those samples from
    another distribution than the model's, which makes every importance weight P/q wrong. Eight
    lines of softmax + multinomial with the KV cache are exact and cost the same.
    """
    device = next(model.parameters()).device
    all_ids, all_logp = [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.full((b, 1), bos_id, dtype=torch.long, device=device)
        logp, past, x = torch.zeros(b, dtype=torch.float64, device=device), None, ids
        for _ in range(T):
            out = model(input_ids=x, past_key_values=past, use_cache=True,
                        attention_mask=torch.ones_like(ids))
            past = out.past_key_values
            log_probs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)    # (b, vocab)
            x = torch.multinomial(log_probs.exp(), 1)                            # (b, 1)
            logp += log_probs.gather(1, x).squeeze(1).double()
            ids = torch.cat([ids, x], dim=1)
        all_ids.append(ids)
        all_logp.append(logp)
    return torch.cat(all_ids), torch.cat(all_logp)


def token_logprobs(model, ids, v_head=None):
    """log m(y_t | BOS, y_<t) of the T generated tokens of ids (B, T + 1), a (B, T) float32 tensor.

    With a value head (Ziegler's PPO), also V(s_t) (B, T): the head on the last hidden state of the
    prefix before each token, BOS included (gdc_spec §1.5). Differentiable unless under no_grad.
    """
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=v_head is not None)
    log_probs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)           # (B, T, vocab)
    logp = log_probs.gather(2, ids[:, 1:, None]).squeeze(2)
    return logp if v_head is None else (logp, v_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1))


def sequence_logprob(model, ids, batch_size=256):
    """log m(x) for each row of ids (B, T + 1): the sum of the T generated tokens' log-probs, (B,).

    Differentiable when called with gradients enabled (for π); wrap it in torch.no_grad() for q and a.
    Computed in batches of `batch_size` rows so that scoring K·B samples fits in memory.
    Note: a sum, not a mean over tokens: the estimators need log π(x) of the whole sequence.
    """
    return torch.cat([token_logprobs(model, ids[i:i + batch_size]).double().sum(1)
                      for i in range(0, ids.shape[0], batch_size)])


def build_tiny(words, seed=0, n_layer=2, n_embd=64, n_head=2, max_len=64, labels=None):
    """A small GPT-2 with a word-level tokenizer, built in code from a fixed seed: no download.
    With `labels`, a sequence classifier with those labels instead of an LM (tasks 5-6, offline).

    The vocabulary is BOS/EOS/PAD ("<|endoftext|>", id 0), "<unk>" (id 1), then `words` in order.
    The weights are random, so the model is close to uniform over its vocabulary: a stand-in for
    GPT-2 that lets every part of the pipeline run offline, in seconds, on a CPU.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>")
    config = GPT2Config(vocab_size=len(vocab), n_positions=max_len, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        **(dict(id2label=dict(enumerate(labels))) if labels else {}))
    # Seed only the construction, and restore the caller's RNG: building a model is not a side effect.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (GPT2ForSequenceClassification if labels else GPT2LMHeadModel)(config)
    return model.eval(), tokenizer


# -----------------------------------------------------------------------------
# Tasks: binary features φ(x) and their target moments μ̄ (paper §4.2)
#
# A feature is "word:W" (x contains the word W), "list:NAME" (x contains a word of the list NAME)
# or "female" (x has more female than male pronouns). Case rule: a single word matches exactly as
# written, so "WikiLeaks" is the paper's word and "wikileaks" is not; word lists and pronouns match
# the lowercased text, so "She" counts as a female pronoun (naver/gdc counted only "she").
# Word tokens are maximal runs of letters and digits, so "amazing," and "amazing-looking" contain
# "amazing" but "amazingly" does not. No downloaded tokenizer data is needed.
# -----------------------------------------------------------------------------

# Our own compact word lists, written for this project (the paper used PPLM's lists).
WORDLISTS = {
    "politics": "government election senate congress parliament president minister policy vote voters "
                "campaign democracy law legislation party tax reform diplomat treaty governor",
    "science": "science scientist research experiment physics chemistry biology laboratory theory "
               "molecule atom quantum genome telescope evolution cell energy scientists",
    "art": "art artist painting painter sculpture museum gallery canvas poetry poet novel theatre "
           "composer exhibition portrait",
    "sports": "football soccer basketball tennis baseball hockey athlete coach team championship "
              "league olympic tournament stadium",
    "business": "business company market economy investor profit revenue startup shares stock bank "
                "finance trade industry",
}
WORDLISTS = {name: tuple(words.split()) for name, words in WORDLISTS.items()}
FEMALE, MALE = ("she", "her", "hers", "herself"), ("he", "him", "his", "himself")

# task → [(feature, μ̄)], numbered as in the paper §4.2.
TASKS = {
    "amazing": [("word:amazing", 1.0)],                                          # task 1
    "wikileaks": [("word:WikiLeaks", 1.0)],                                      # task 2
    "politics": [("list:politics", 1.0)],                                        # task 3
    "science": [("list:science", 1.0)],                                          # task 4
    "positive": [("sentiment:positive", 1.0)],                                   # task 5
    "negative": [("sentiment:negative", 1.0)],                                   # task 6
    "female": [("female", 0.5)],                                                 # task 7
    "topics": [(f"list:{t}", 0.25) for t in ("science", "art", "sports", "business")],  # task 8
    "hybrid-sports": [("female", 0.5), ("list:sports", 1.0)],                    # task 9
    "hybrid-politics": [("female", 0.5), ("list:politics", 1.0)],                # task 10
}


def words_of(text):
    return re.findall(r"\w+", text)


def feature(name, text, wordlists=WORDLISTS):
    """φ(x) ∈ {0, 1} of one decoded text for the feature `name` (see the section comment)."""
    tokens = words_of(text)
    kind, _, arg = name.partition(":")
    if kind == "word":
        return float(arg in tokens)
    lower = [t.lower() for t in tokens]
    if kind == "list":
        return float(not set(wordlists[arg]).isdisjoint(lower))
    if kind == "female":
        return float(sum(t in FEMALE for t in lower) > sum(t in MALE for t in lower))
    raise ValueError(f"unknown feature {name!r}: use word:W, list:NAME or female")


def phi_matrix(features, texts, wordlists=WORDLISTS, classifier=None):
    """φ of N texts for k features, an (N, k) float tensor; sentiment features need the classifier."""
    columns = [classify(classifier, texts, f.partition(":")[2]) if f.startswith("sentiment:")
               else torch.tensor([feature(f, x, wordlists) for x in texts]) for f in features]
    return torch.stack(columns, dim=1) if columns else torch.zeros(len(texts), 0)


@torch.no_grad()
def classify(classifier, texts, label, batch_size=32):
    """φ(x) = 1 where the classifier's most likely label for x is `label` (tasks 5-6), as an (N,) tensor.

    The paper used a PPLM sentiment head on GPT-2 medium (gdc_spec §4); any HF sequence classifier with
    a label named POSITIVE/NEGATIVE (any case, or pos/neg) serves here. Batched on the model's device.
    """
    model, tokenizer = classifier
    names = {name.lower()[:3]: int(i) for i, name in model.config.id2label.items()}
    device, out = next(model.parameters()).device, []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt").to(device)
        out.append(model(**enc).logits.argmax(-1).cpu() == names[label[:3]])
    return torch.cat(out).float() if out else torch.zeros(0)


def tiny_vocab(extra=(), size=1000):
    """The words of `--model tiny`: every word of the built-in tasks, the `extra` words of custom
    constraints, then made-up filler words ("baba", "babe", ...) up to `size` words.

    A random tiny model is close to uniform, so a given word occurs in about 1 − (1 − 1/size)^T of
    samples of T tokens: 2% for T = 20, and a list of 19 words in about 32%. Every built-in feature
    thus starts rare but not absent (the measured rates are in README.md).
    """
    words = ["amazing", "WikiLeaks", *FEMALE, *MALE, *extra, *(w for ws in WORDLISTS.values() for w in ws)]
    words = list(dict.fromkeys(words))                              # unique, in order
    taken = {w.lower() for w in words}
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    filler = [s + t for s in syllables for t in syllables if (s + t) not in taken]
    return words + filler[:max(0, size - len(words))]


def from_pretrained(auto_class, name, flag):
    """A model (of transformers' `auto_class`) and tokenizer by HF name or path, or one line of BadInput."""
    import transformers
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # no retry chatter: one line if it fails
    try:
        return (getattr(transformers, auto_class).from_pretrained(name).eval(),
                transformers.AutoTokenizer.from_pretrained(name))
    except (OSError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(f"cannot load {flag} {name!r} ({why}); with no network, use {flag} tiny") from None


def load_lm(name, extra_words=()):
    """The original LM a and its tokenizer: `from_pretrained(name)`, or the offline tiny model."""
    if name == "tiny":
        return build_tiny(tiny_vocab(extra_words))
    return from_pretrained("AutoModelForCausalLM", name, "--model")


def load_classifier(name, device):
    """The sentiment classifier of tasks 5-6: `from_pretrained(name)`, or a random tiny one (plumbing only)."""
    if name == "tiny":
        model, tokenizer = build_tiny(tiny_vocab(), seed=1, labels=("NEGATIVE", "POSITIVE"))
    else:
        model, tokenizer = from_pretrained("AutoModelForSequenceClassification", name, "--classifier")
    labels = [str(v) for v in model.config.id2label.values()]
    if not {"pos", "neg"} <= {v.lower()[:3] for v in labels}:
        raise BadInput(f"classifier {name!r} has labels {labels}, none named positive and negative: "
                       f"use --classifier with a sentiment model")
    if tokenizer.pad_token is None:                                 # GPT-2-like classifiers have none
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def task_features(cfg):
    """The features, target moments μ̄ and word lists of the task that `cfg` asks for."""
    wordlists = dict(WORDLISTS)
    if cfg.word or cfg.wordlist:
        task = [(f"word:{cfg.word}", 1.0)] if cfg.word else []
        if cfg.wordlist:
            try:
                with open(cfg.wordlist, encoding="utf-8") as f:
                    lines = [w.strip() for w in f]
            except OSError as e:
                raise BadInput(f"cannot read --wordlist {cfg.wordlist!r}: {e.strerror}") from None
            words = tuple(w.lower() for w in lines if w and not w.startswith("#"))
            bad = [w for w in words if not re.fullmatch(r"\w+", w)]
            if not words or bad:
                raise BadInput(f"--wordlist {cfg.wordlist!r} must hold one word per line (letters and "
                               f"digits only); found {bad[:3] if bad else 'no words'}")
            wordlists[cfg.wordlist] = words
            task.append((f"list:{cfg.wordlist}", 1.0))
        if cfg.word and not re.fullmatch(r"\w+", cfg.word):
            raise BadInput(f"--word {cfg.word!r} must be one word of letters and digits")
    elif cfg.task in TASKS:
        task = TASKS[cfg.task]
    else:
        raise BadInput(f"unknown task {cfg.task!r}: choose one of {', '.join(TASKS)}, or give --word or --wordlist")
    features, mu_bar = [f for f, _ in task], [m for _, m in task]
    if cfg.moments:
        try:
            mu_bar = [float(m) for m in cfg.moments.split(",")]
        except ValueError:
            raise BadInput(f"--moments {cfg.moments!r}: give numbers separated by commas, e.g. 0.5,1") from None
        if len(mu_bar) != len(features):
            raise BadInput(f"--moments has {len(mu_bar)} values but the task has {len(features)} features "
                           f"({', '.join(features)}): give one per feature")
    if not all(0 <= m <= 1 for m in mu_bar):
        raise BadInput(f"target moments {mu_bar} must lie in [0, 1]: each is the probability of a binary feature")
    return features, mu_bar, wordlists


def log_P_of(logp_a, phi, lam=None):
    """log P(x) of the energy-based model built on a (paper eq. 16; gdc_spec §2):

        pointwise, every μ̄ = 1 (lam is None):  P(x) = a(x)·Π_i φ_i(x)     a hard constraint
        otherwise:                              P(x) = a(x)·exp(λ·φ(x))

    Note: with every μ̄ = 1 the exponential family would need λ = +inf; P = a·φ is its limit, with
    P = 0 (log P = −inf) wherever a constraint fails. Hybrid tasks approach their μ̄ = 1 feature with
    a large finite λ instead, as naver/gdc does.
    """
    if lam is None:
        return torch.where((phi > 0).all(dim=1), logp_a, -math.inf)
    return logp_a + phi.to(logp_a.dtype) @ lam.to(logp_a.dtype)


# -----------------------------------------------------------------------------
# Evaluation (paper §4.2) and reporting
# -----------------------------------------------------------------------------


def tokens_of(text):
    """Word and punctuation tokens (the rule of nltk's wordpunct_tokenize, which needs no data)."""
    return re.findall(r"\w+|[^\w\s]+", text)


def distinct_n(texts, n):
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams, over the tokens of all texts.

    1 means no n-gram occurs twice among the samples; a policy that collapses onto a few texts or
    words scores near 0. The value falls as texts are added, so compare runs at equal sample counts.
    Note: naver/gdc averaged a per-text ratio over texts and divided it by the token count, not the
    n-gram count (gdc_spec §3): that measures repetition within a text, not across samples.
    """
    grams = [tuple(t[i:i + n]) for t in map(tokens_of, texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def self_bleu(texts, ns=(3, 4, 5)):
    """Self-BLEU-n (Zhu et al. 2018, Texygen) for each n in ns: the mean, over texts, of the BLEU-n of a
    text against all the others as references, on word tokens, smoothed (nltk's method1).

    1 means every sample is a copy of the others (for texts of at least n tokens), 0 that no text
    shares a single token with another; lower is more diverse. The cost is quadratic in len(texts),
    so callers pass a bounded subset. Note: naver/gdc passed raw strings to nltk, which made its
    n-grams character n-grams (gdc_spec §3).
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    tokens = [tokens_of(t) for t in texts]
    if len(tokens) < 2:
        return [math.nan for _ in ns]
    weights, smooth = [(1 / n,) * n for n in ns], SmoothingFunction().method1
    scores = [sentence_bleu(tokens[:i] + tokens[i + 1:], hyp, weights, smoothing_function=smooth)
              for i, hyp in enumerate(tokens)]
    # nltk returns a list with one score per weight tuple, but a bare 0 when no unigram matches
    scores = [s if isinstance(s, list) else [s] * len(ns) for s in scores]
    return [sum(column) / len(scores) for column in zip(*scores)]


@torch.no_grad()
def evaluate(pi, score, n, T, bos, Z_hat, batch_size, tokenizer, n_diverse):
    """E_π φ and D_KL(π‖a) on n exact samples of π, Distinct-1,2,3 and Self-BLEU-3,4,5 on the first
    n_diverse of them (both depend on the sample count), and the texts.

    Paper §4.2 evaluates on samples of π_θ; naver/gdc evaluated q for pointwise tasks (gdc_spec §7.1).
    Samples are exact (naver/gdc used top-p 0.9 here), since D_KL(π‖a) = E_π[log π − log a] needs π's
    own distribution. D_KL(p‖π) and TVD(p, π) are also estimated here with π as the proposal
    (`_on_pi`), but the headline values come from the q-check (see `train`): an estimate from π's own
    samples cannot see the part of p that π has lost. Reinforce on the tiny model (100 steps): 0.59
    nats from samples of π, 9.2 from samples of a.
    """
    ids, logp_pi = sample(pi, n, T, bos, batch_size)
    logp_a, phi, log_P = score(ids)
    texts = tokenizer.batch_decode(ids[:, 1:].tolist())
    diverse = texts[:n_diverse]
    bleu = self_bleu(diverse, (3, 4, 5))
    return texts, dict(
        E_pi_phi=phi.mean(0).tolist(),
        kl_p_pi_on_pi=kl_p_m(log_P, logp_pi, logp_pi, Z_hat).item(),
        kl_pi_a=kl_reverse(logp_pi, logp_a).item(),
        tvd_p_pi_on_pi=tvd_p_m(log_P, logp_pi, logp_pi, Z_hat).item(),
        **{f"distinct_{k}": distinct_n(diverse, k) for k in (1, 2, 3)},
        **{f"self_bleu_{k}": b for k, b in zip((3, 4, 5), bleu)})


def fmt(values):
    return "/".join(f"{v:.3g}" for v in values)


def say(text):
    """print, on a line of its own even while the progress bar is drawn, and at once (not buffered)."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")                                # clear the progress bar's line
    print(text, flush=True)


def progress(step, n_steps, t0):
    """A progress bar on stderr, drawn only in a terminal (logs get the evaluation lines instead)."""
    if sys.stderr.isatty():
        done, elapsed = (step + 1) / (n_steps + 1), time.time() - t0
        bar = "#" * int(30 * done)
        sys.stderr.write(f"\r[{bar:<30}] step {step}/{n_steps}  {elapsed:.0f}s, ~{elapsed / done - elapsed:.0f}s left ")
        sys.stderr.write("\n" if step == n_steps else "")


# -----------------------------------------------------------------------------
# Training: Algorithm 1 (KL-adaptive DPG; GDC++ with the baseline, GDC without it), and the same loop
# for the paper's reward-maximisation baselines, Reinforce and Ziegler (PPO), which differ from it only
# in what they sample (π instead of q) and in their update.
# -----------------------------------------------------------------------------


def method_name(cfg):
    """The paper's name of the method that cfg asks for (§4.3)."""
    if cfg.method == "dpg":
        return "GDC++" if cfg.baseline else "GDC"
    return "Reinforce" + ("-baseline" if cfg.baseline else "") if cfg.method == "reinforce" else "Ziegler"


@torch.no_grad()
def ppo_rollout(pi, v_head, a, ids, R, beta, f):
    """What PPO holds fixed while it updates on a batch ids ~ π with scores R (gdc_spec §1.5): per-token
    log π_old and V_old, then the KL-penalised rewards and their GAE advantages and returns (B, T)."""
    old = [token_logprobs(pi, ids[i:i + f], v_head) for i in range(0, len(ids), f)]
    logp_old, V_old = torch.cat([lp for lp, _ in old]), torch.cat([V for _, V in old])
    logp_a = torch.cat([token_logprobs(a, ids[i:i + f]) for i in range(0, len(ids), f)])
    A, returns = gae(kl_penalty_rewards(logp_old, logp_a, R, beta), V_old)
    return logp_old, V_old, A, returns, (logp_old - logp_a).sum(1).mean().item()


def check_finite(step, **quantities):
    """Stop before an update that would carry a NaN or ±inf into π, naming the step and the quantity.

    Importance weights are exp of float64 log-ratios: a weight below e^−745 becomes exactly 0 (its
    correct limit), but one above e^709 (log P/q > 709 nats) becomes +inf, and so do the loss and the
    gradients it weighs. Adam would turn that into NaN weights for good, so we stop instead.
    """
    for name, x in quantities.items():
        x = torch.as_tensor(x)
        if not torch.isfinite(x).all():
            kind = "NaN" if torch.isnan(x).any() else "infinite"
            raise NotFinite(f"step {step}: {name} is {kind}, so π was not updated with it; lower --lr or "
                            f"check the task (a log P/q beyond 709 nats overflows float64)")


def grad_norm(params):
    """‖∇‖ over all parameters, in float64: NaN or inf if any gradient entry is."""
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))


def ppo_update(pi, v_head, ids, logp_old, V_old, A, returns, cfg, optimizer, scheduler, step=0):
    """--ppo-epochs passes over the batch in shuffled minibatches, one Adam step per minibatch.
    Advantages are whitened per minibatch, as in naver/gdc. Returns each minibatch's ratios π/π_old."""
    ratios = []
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(ids), device=ids.device).split(cfg.ppo_minibatch):
            logp, V = token_logprobs(pi, ids[mb], v_head)
            A_mb = (A[mb] - A[mb].mean()) / torch.sqrt(A[mb].var(unbiased=False) + 1e-8)
            loss, ratio = ppo_loss(logp, logp_old[mb], A_mb, V, V_old[mb], returns[mb])
            optimizer.zero_grad()
            loss.backward()
            check_finite(step, **{"PPO loss": loss, "gradient norm": grad_norm(optimizer.param_groups[0]["params"])})
            optimizer.step()
            scheduler.step()
            ratios.append(ratio.detach())
    return ratios


# The loop's running state besides the models, optimizer and RNGs: everything a checkpoint must hold for
# a resumed run to log the very same metrics as one never interrupted.
LOOP_STATE = ("Z_hat", "rounds", "q_updates", "q_updated", "lam", "beta", "batch", "var_G", "ess_q",
              "kl_pi", "kl_q", "tvd_pi", "m")


def checkpoints(out):
    """The steps of the complete checkpoints in OUT, in order (a `.tmp` folder is an unfinished one)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted(int(m.group(1)) for m in (re.fullmatch(r"checkpoint-(\d+)", n) for n in names) if m)


def save_checkpoint(out, step, pi, q, state):
    """Write OUT/checkpoint-STEP (π and q by save_pretrained, the rest in state.pt), then drop older ones.

    It is written to a `.tmp` folder and renamed into place when complete. A rename is atomic, so a run
    killed while saving leaves the previous checkpoint whole, and --resume never sees half a checkpoint.
    """
    path = os.path.join(out, f"checkpoint-{step}")
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    pi.save_pretrained(os.path.join(path + ".tmp", "pi"))
    q.save_pretrained(os.path.join(path + ".tmp", "q"))
    torch.save(state, os.path.join(path + ".tmp", "state.pt"))
    os.rename(path + ".tmp", path)
    for old in checkpoints(out)[:-1]:
        shutil.rmtree(os.path.join(out, f"checkpoint-{old}"))


def load_checkpoint(out, pi, q):
    """Load the last checkpoint of OUT into π and q; return its state (step, optimizer, RNGs, LOOP_STATE)."""
    path = os.path.join(out, f"checkpoint-{checkpoints(out)[-1]}")
    for model, name in ((pi, "pi"), (q, "q")):
        saved = type(model).from_pretrained(os.path.join(path, name))
        model.load_state_dict(saved.state_dict())
    # weights_only=False: state.pt holds Python and NumPy RNG states, and we wrote it ourselves.
    return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)


def rng_states():
    """Every RNG a run draws from (Python, NumPy, torch CPU, each CUDA device), for the checkpoint."""
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def truncate_metrics(out, step):
    """Keep the lines of OUT/metrics.jsonl up to `step`: a killed run may have logged later steps (or half
    a line) after its last checkpoint, and the resumed run logs them again. Replaced atomically, too."""
    path, keep = os.path.join(out, "metrics.jsonl"), []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except ValueError:                                      # a half-written last line
                break
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def saved_flags(out):
    """The Config fields of the run in folder OUT, from OUT/config.json; None if it holds no dpg_min run."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            saved = json.load(f)["dpg_min"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {k: v for k, v in saved.items() if k in {f.name for f in fields(Config)}}


def n_steps_of(cfg, mu_bar):
    """Gradient steps of the run: --steps, or --samples / B (gdc_spec §5: 6.4M samples pointwise, else 8.4M)."""
    samples = cfg.samples or (6_400_000 if all(m == 1 for m in mu_bar) else 8_400_000)
    return cfg.steps or -(-samples // cfg.batch_size)


def train(cfg, a, tokenizer, log=None):
    """Fine-tune π from a to approximate p ∝ P on the task of `cfg`; write everything to cfg.out.

    Paper, Algorithm 1 (KL-adaptive DPG), one gradient step per batch:
        x_1..x_B ~ q;   A(x) = P(x)/q(x) − Ẑ·π(x)/q(x)  (GDC++; GDC drops the second term)
        θ ← θ + α·(1/B)·Σ_i A(x_i)·∇log π_θ(x_i)
        every K steps: Ẑ from fresh samples of q; if D_KL(p‖π) < D_KL(p‖q), q ← π
    Reinforce and Ziegler sample π instead and never replace q = a; their q-checks only estimate Z and
    D_KL(p‖π) by importance sampling from a, so every method reports the same metrics.
    """
    import transformers
    transformers.utils.logging.disable_progress_bar()              # ours, not one bar per checkpoint saved
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log = log or say
    torch.manual_seed(cfg.seed)
    features, mu_bar, wordlists = task_features(cfg)
    B, f, T, K = cfg.batch_size, cfg.forward_batch_size, cfg.seq_len, cfg.q_update_interval
    n_steps = n_steps_of(cfg, mu_bar)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sentiment = any(f.startswith("sentiment:") for f in features)
    classifier = load_classifier(cfg.classifier, device) if sentiment else None

    # The three LMs. All stay in eval mode: dropout would make the π we differentiate differ from the π
    # that sampled and scored x (naver/gdc trained without dropout too, gdc_spec §1.0).
    a = a.to(device).eval().requires_grad_(False)                   # original LM, frozen
    q = copy.deepcopy(a)                                            # proposal, replaced by π now and then
    pi = copy.deepcopy(a).requires_grad_(True)                      # the policy π_θ we train
    params, v_head, beta = list(pi.parameters()), None, None
    if cfg.method == "ziegler":                                     # PPO's value head, from V = 0
        v_head = torch.nn.Linear(pi.config.hidden_size, 1).to(device)
        torch.nn.init.zeros_(v_head.weight), torch.nn.init.zeros_(v_head.bias)
        params += list(v_head.parameters())
        beta = cfg.kl_beta

    def score(ids, lam):
        """log a(x), φ(x) and log P(x) of samples ids (N, T + 1); each computed once per sample."""
        with torch.no_grad():
            logp_a = sequence_logprob(a, ids, f)
        texts = tokenizer.batch_decode(ids[:, 1:].tolist())
        phi = phi_matrix(features, texts, wordlists, classifier).to(device)
        return logp_a, phi, log_P_of(logp_a, phi, lam)

    # The EBM (paper §4.1). Distributional tasks: fit λ by SNIS on samples of q = a, where w = a/q = 1.
    # A resumed run takes λ, π and q from its checkpoint instead.
    lam, state = None, load_checkpoint(cfg.out, pi, q) if cfg.resume else None
    if state is None and any(m != 1 for m in mu_bar):
        ids, _ = sample(a, cfg.lambda_samples, T, bos, B)
        _, phi, _ = score(ids, None)
        try:
            lam, mu_hat = fit_lambdas(phi.double(), torch.zeros(len(ids), dtype=torch.float64, device=device),
                                      mu_bar, cfg.lambda_tol)
        except ValueError as e:
            raise BadInput(f"fitting λ on {cfg.lambda_samples} samples of a: {e}") from None
        log(f"λ = {fmt(lam.tolist())} gives E_p φ ≈ {fmt(mu_hat.tolist())} for μ̄ = {fmt(mu_bar)} "
            f"({cfg.lambda_samples} samples of a)")
        if torch.linalg.vector_norm(mu_hat - torch.tensor(mu_bar, device=device).double()) >= cfg.lambda_tol:
            log(f"warning: λ did not reach the targets within --lambda-tol {cfg.lambda_tol}; training goes on")
    if cfg.overwrite:                                               # only now: bad input writes nothing
        shutil.rmtree(cfg.out, ignore_errors=True)
    os.makedirs(cfg.out, exist_ok=True)
    pi.config.dpg_min = asdict(cfg)                                 # the run's config, in OUT/config.json
    pi.config.save_pretrained(cfg.out)

    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    log(f"{method_name(cfg)} on {', '.join(features)} (μ̄ = {fmt(mu_bar)}), {cfg.model}, "
        f"{n_steps} steps of B = {B} samples of T = {T} tokens, on {device}")
    Z_hat, rounds, q_updates, q_updated = 0.0, 0, 0, False
    var_G = ess_q = kl_pi = kl_q = tvd_pi = math.nan
    batch = dict(mean_A=math.nan, mean_abs_A=math.nan, var_A=math.nan, mean_P_q=None, mean_Zpi_q=None)
    m, start, t0 = None, 0, time.time()
    if state is not None:                                           # --resume: where the checkpoint left off
        optimizer.load_state_dict(state["optimizer"])
        warmup.load_state_dict(state["scheduler"])
        for g in optimizer.param_groups:                            # --lr may differ from the run's
            g["initial_lr"], g["lr"] = cfg.lr, cfg.lr * warmup.lr_lambdas[0](warmup.last_epoch)
        warmup.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        if v_head is not None:
            v_head.load_state_dict(state["v_head"])
        (Z_hat, rounds, q_updates, q_updated, lam, beta, batch, var_G, ess_q,
         kl_pi, kl_q, tvd_pi, m) = (state[k] for k in LOOP_STATE)
        set_rng_states(state["rng"])
        start, t0 = state["step"] + 1, time.time() - state["seconds"]
        truncate_metrics(cfg.out, state["step"])
        log(f"resumed from {cfg.out}/checkpoint-{state['step']}")
    for step in range(start, n_steps + 1):
        if step > 0:
            # Algorithm 1, lines 3-6. log q(x) comes with each sample; log a(x) and φ(x) are computed
            # once. DPG samples the proposal q; Reinforce and Ziegler sample π itself (on-policy).
            ids, logp_q = sample(q if cfg.method == "dpg" else pi, B, T, bos, B)
            logp_a, phi, log_P = score(ids, lam)
            R = (log_P > -math.inf).to(log_P.dtype)                 # the RL methods' reward: φ(x), pointwise
            if cfg.method == "reinforce" and cfg.baseline:
                R = R - R.mean()                                    # the RL baseline E R (eq. 12)
            if cfg.method == "ziegler":
                logp_old, V_old, A, returns, kl = ppo_rollout(pi, v_head, a, ids, R, beta, f)
            logp_pi = torch.empty(B, dtype=torch.float64, device=device)

            def loss_of(s):
                """The loss of the samples ids[s]: its gradient is the method's estimate on them."""
                if cfg.method == "ziegler":                         # PPO's gradient at ρ = 1, unclipped
                    return -(A[s] * token_logprobs(pi, ids[s])).sum(1).mean()
                lp = sequence_logprob(pi, ids[s], f)
                logp_pi[s] = lp.detach()                            # kept for GDC++'s advantage below
                if cfg.method == "reinforce":
                    return reinforce_loss(lp, R[s])
                return dpg_loss(lp, logp_q[s], log_P[s], Z_hat, cfg.baseline)

            if cfg.grad_var_interval and step % cfg.grad_var_interval == 0:     # §4.5, before the update
                var_G = grad_variance(pi.parameters(), lambda j: loss_of(slice(j, j + 1)),
                                      min(B, cfg.grad_var_samples))
            if cfg.method == "ziegler":
                check_finite(step, **{"advantage A (GAE)": A})
                ppo_update(pi, v_head, ids, logp_old, V_old, A, returns, cfg, optimizer, warmup, step)
                beta = adaptive_beta(beta, kl, cfg.kl_target, cfg.kl_horizon, B)
            else:
                # Accumulate over chunks of f samples, each chunk's mean loss weighted by its share of
                # the batch, so the step is exactly the batch-mean gradient for any f (naver/gdc summed
                # the chunk means, gdc_spec §1.0, which only Adam's eps tells apart).
                optimizer.zero_grad()
                loss = 0.0
                for i in range(0, B, f):
                    chunk_loss = loss_of(slice(i, i + f)) * (min(f, B - i) / B)
                    chunk_loss.backward()
                    loss += chunk_loss.detach()
                A = R if cfg.method == "reinforce" else dpg_advantage(logp_pi, logp_q, log_P, Z_hat, cfg.baseline)
                check_finite(step, **{"advantage A": A, "loss": loss, "gradient norm": grad_norm(params)})
                optimizer.step()
                warmup.step()
            batch = dict(mean_A=A.mean().item(), mean_abs_A=A.abs().mean().item(),   # eqs. 19-20
                         var_A=A.var(unbiased=False).item(), mean_P_q=None, mean_Zpi_q=None)
            if cfg.method == "dpg":                                 # Fig. 2: A's two parts, P/q and Ẑ·π/q
                batch.update(mean_P_q=torch.exp(log_P - logp_q).mean().item(),
                             mean_Zpi_q=Z_hat * torch.exp(logp_pi - logp_q).mean().item())
        if step % K == 0 or step == n_steps:
            # Algorithm 1, lines 7-10, on K·B fresh samples of q: reusing the training batch would
            # make Ẑ and the KL comparison depend on the very samples π was just fitted to. Ẑ is the
            # equal-weight mean of all rounds' estimates (gdc_spec §1.3), each unbiased (eq. 13).
            # Step 0 is the first round, so Ẑ exists before the first baseline needs it.
            ids, logp_q = sample(q, K * B, T, bos, B)
            _, _, log_P = score(ids, lam)
            Z_round, ess_q = estimate_Z(log_P, logp_q).item(), ess(log_P - logp_q) / len(ids)
            check_finite(step, **{"Ẑ of this round": Z_round})    # never let an inf Ẑ into a checkpoint
            Z_hat, rounds = (Z_round + rounds * Z_hat) / (rounds + 1), rounds + 1
            with torch.no_grad():
                logp_pi = sequence_logprob(pi, ids, f)
            kl_pi = kl_p_m(log_P, logp_q, logp_pi, Z_hat).item()
            kl_q = kl_p_m(log_P, logp_q, logp_q, Z_hat).item()
            tvd_pi = tvd_p_m(log_P, logp_q, logp_pi, Z_hat).item()
            if Z_round == 0:
                log(f"step {step}: no sample of q has P(x) > 0 among {K * B}, so this round adds 0 to Ẑ "
                    f"(now {Z_hat:.3g}){'; q is kept and there is no baseline' if Z_hat == 0 else ''}")
            if cfg.method == "dpg" and step > 0 and kl_pi < kl_q:   # never true while Ẑ = 0 (both +inf)
                q.load_state_dict(pi.state_dict())
                q_updates, q_updated = q_updates + 1, True
        if step % cfg.eval_interval == 0 or step == n_steps:
            texts, m = evaluate(pi, lambda ids: score(ids, lam), cfg.eval_samples, T, bos, Z_hat, B, tokenizer,
                                cfg.diversity_samples)
            m = dict(step=step, samples=step * B, **m, kl_p_pi=kl_pi, tvd_p_pi=tvd_pi, kl_p_q=kl_q, Z_hat=Z_hat,
                     **batch, var_G=var_G, ess_P_q=ess_q, q_updated=q_updated,
                     q_updates=q_updates, beta=beta,
                     seconds=round(time.time() - t0, 1))
            log(f"step {step:>{len(str(n_steps))}}/{n_steps}  E_π φ {fmt(m['E_pi_phi'])}  "
                f"KL(p‖π) {m['kl_p_pi']:.3f}  KL(π‖a) {m['kl_pi_a']:.3f}  TVD(p,π) {m['tvd_p_pi']:.3f}  "
                f"Self-BLEU-5 {m['self_bleu_5']:.3f}  Distinct-1 {m['distinct_1']:.3f}  "
                f"Ẑ {Z_hat:.3g}  mean|A| {batch['mean_abs_A']:.3g}  Var(A) {batch['var_A']:.3g}"
                + (f"  Var(G) {var_G:.3g}" if cfg.grad_var_interval else "")
                + (f"  q updates {q_updates}" if cfg.method == "dpg" else "")
                + (f"  β {beta:.3g}" if cfg.method == "ziegler" else "") + f"  {m['seconds']:.0f}s")
            for text in texts[:3]:
                log(f"    {text[:120]!r}")
            # JSON has no inf or NaN (a KL estimate while Ẑ = 0, mean|A| before step 1): write null.
            m = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}
            with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as file:
                file.write(json.dumps(m) + "\n")
            q_updated = False
        if step % cfg.save_interval == 0 or step == n_steps:
            loop_state = (Z_hat, rounds, q_updates, q_updated, lam, beta, batch, var_G, ess_q,
                          kl_pi, kl_q, tvd_pi, m)
            save_checkpoint(cfg.out, step, pi, q, dict(
                zip(LOOP_STATE, loop_state), step=step, seconds=time.time() - t0, rng=rng_states(),
                optimizer=optimizer.state_dict(), scheduler=warmup.state_dict(),
                v_head=v_head.state_dict() if v_head is not None else None))
        progress(step, n_steps, t0)
    pi.save_pretrained(cfg.out)
    tokenizer.save_pretrained(cfg.out)
    log(f"saved π to {cfg.out}: load it with AutoModelForCausalLM.from_pretrained({cfg.out!r})")
    return pi, m


# -----------------------------------------------------------------------------
# Plots: `python dpg_min.py plot RUN_DIR ... --out FILE.png` draws the paper's figures from the logs
# -----------------------------------------------------------------------------

# (metrics.jsonl key, panel title), in the order of the paper's Figs. 3, 5 and 2.
PANELS = [("E_pi_phi", "E_π φ"), ("kl_p_pi", "KL(p‖π)"), ("kl_pi_a", "KL(π‖a)"), ("self_bleu_5", "Self-BLEU-5"),
          ("distinct_1", "Distinct-1"), ("tvd_p_pi", "TVD(p, π)"), ("mean_abs_A", "E|A|"), ("var_A", "Var(A)"),
          ("var_G", "Var(G)"), ("mean_P_q", "reward P/q"), ("mean_Zpi_q", "Ẑ·π/q"), ("mean_A", "advantage A")]
STYLES = ["-", "--", ":", "-."]                                     # line styles: seeds, or features of E_π φ


def read_run(path):
    """(label, Config, metrics rows) of the run in folder `path`."""
    try:
        saved = saved_flags(path)
        with open(os.path.join(path, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    except (OSError, ValueError):
        saved = None
    if saved is None:
        raise BadInput(f"{path!r} holds no dpg_min run (config.json and metrics.jsonl)")
    cfg = Config(**saved)
    return f"{method_name(cfg)} B={cfg.batch_size}", cfg, rows


def first(value):
    """The first feature's value of a metric that may be per feature (E_π φ), or the value itself."""
    return value[0] if isinstance(value, list) else value


def summary(label, rows, reach):
    """The table row of a run: its last metrics, when it first reached E_π φ ≥ reach, and the means of
    the variance diagnostics over its logged steps (where they are defined)."""
    last = rows[-1]
    hit = next((r["samples"] for r in rows if first(r["E_pi_phi"]) >= reach), None)

    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return f"{sum(values) / len(values):.3g}" if values else "-"
    return (f"| {label} | {last['samples']} | {fmt(last['E_pi_phi'])} | {last['kl_p_pi'] or math.inf:.3g} | "
            f"{last['kl_pi_a']:.3g} | {last['tvd_p_pi'] or math.inf:.3g} | {last['self_bleu_5']:.3f} | "
            f"{last['distinct_1']:.3f} | {hit if hit is not None else 'never'} | {mean('mean_abs_A')} | "
            f"{mean('var_A')} | {mean('var_G')} |")


def plot(argv):
    """`dpg_min.py plot RUN_DIR ...`: one panel per metric, one line per run, against training samples;
    and a Markdown table of the runs on stdout."""
    parser = argparse.ArgumentParser(prog="dpg_min.py plot", description=plot.__doc__.split(";")[0])
    parser.error = refuse
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of dpg_min.py runs")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="the figure to write (PNG, PDF, SVG)")
    parser.add_argument("--metrics", default=",".join(k for k, _ in PANELS[:9]), help="comma-separated keys "
                        f"of metrics.jsonl, one panel each, of: {', '.join(k for k, _ in PANELS)}")
    parser.add_argument("--reach", type=float, default=0.5, help="the table reports the samples each run "
                        "took to reach E_π φ ≥ this (paper Fig. 4: 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    runs = [read_run(path) for path in args.runs]
    if os.path.exists(args.out) and not args.overwrite:
        raise BadInput(f"--out {args.out!r} already exists; choose a new file, or add --overwrite")
    titles = dict(PANELS)
    keys = [k for k in args.metrics.split(",") if any(r.get(k) is not None for _, _, rows in runs for r in rows)]
    if not keys:
        raise BadInput(f"--metrics {args.metrics!r}: none of these is logged by the runs; "
                       f"choose from {', '.join(titles)}")
    # One line per run: one colour per method (and task, if they differ), one line style per seed.
    tasks, seeds = {c.task for _, c, _ in runs}, list(dict.fromkeys(c.seed for _, c, _ in runs))
    colours, lines = {}, []                                         # lines: (label, rows, colour, style)
    for label, c, rows in runs:
        label += f" {c.task}" if len(tasks) > 1 else ""
        colour = colours.setdefault(label, f"C{len(colours)}")
        lines.append((label + (f" seed {c.seed}" if len(seeds) > 1 else ""), rows, colour,
                      STYLES[seeds.index(c.seed) % len(STYLES)]))
    try:
        import matplotlib
        matplotlib.use("Agg")                                       # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("plot needs matplotlib, which is optional: pip install matplotlib") from None

    cols = min(3, len(keys))
    fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(4.2 * cols, 3.2 * -(-len(keys) // cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, rows, colour, style in lines:
            points = [(r["samples"], r[key]) for r in rows if r.get(key) is not None]
            per_feature = [v if isinstance(v, list) else [v] for _, v in points]       # E_π φ: one per feature
            for i in range(len(per_feature[0]) if points else 0):
                many = len(per_feature[0]) > 1                          # then a line style per feature
                ax.plot([x for x, _ in points], [v[i] for v in per_feature], color=colour,
                        linestyle=STYLES[i % len(STYLES)] if many else style,
                        label=label + (f" φ{i + 1}" if many else ""))
        ax.set_title(titles.get(key, key)), ax.set_xlabel("training samples")
        if key.startswith("var_"):
            ax.set_yscale("log")                                    # variances span decades
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=72)
    # The table last, so that a reader closing the pipe early (`| head`) cannot stop the figure.
    print(f"| run | samples | E_π φ | KL(p‖π) | KL(π‖a) | TVD(p,π) | Self-BLEU-5 | Distinct-1 | samples to "
          f"E_π φ ≥ {args.reach:g} | mean \\|A\\| | mean Var(A) | mean Var(G) |\n" + "|---" * 12 + "|")
    for label, rows, *_ in lines:
        print(summary(label, rows, args.reach))
    print(f"wrote {args.out}")


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def parse_config(argv=None):
    """Config from command-line flags: one flag per field; `--model tiny` applies TINY to unset flags."""
    parser = argparse.ArgumentParser(prog="dpg_min.py", description=__doc__.split("\n\n")[0])
    parser.error = refuse
    for f in fields(Config):
        tiny = f", tiny: {TINY[f.name]}" if f.name in TINY else ""
        kind = dict(action="store_true") if f.type is bool else dict(type=f.type, metavar=f.name.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), default=None, **kind,
                            help=f.metadata["help"] + (f" [default: {f.default}{tiny}]" if f.default else ""))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if given.get("resume"):
        return resume_config(given)
    cfg = Config(**{**(TINY if given.get("model") == "tiny" else {}), **given})
    check_config(cfg)
    if not cfg.out:                                                 # a new folder for every run
        name = "custom" if cfg.word or cfg.wordlist else cfg.task
        stem = os.path.join("runs", f"{name}-{method_name(cfg).lower()}-"
                                    f"{os.path.basename(cfg.model.rstrip('/'))}-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.out, i = stem, 1
        while os.path.exists(cfg.out):                              # two runs started in the same second
            cfg.out, i = f"{stem}-{i + 1}", i + 1
    if os.path.exists(cfg.out) and (not os.path.isdir(cfg.out) or os.listdir(cfg.out)):
        if not cfg.overwrite:
            raise BadInput(f"--out {cfg.out!r} already exists and is not an empty directory; choose a new one, "
                           f"or add --resume {cfg.out} to continue its run, or --overwrite to replace it")
        if saved_flags(cfg.out) is None:
            raise BadInput(f"--overwrite: {cfg.out!r} holds no dpg_min run (no config.json), so it is left "
                           f"alone; choose another --out")
    base = os.path.abspath(cfg.out)                                 # the folder that OUT will be made in
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not (os.path.isdir(base) and os.access(base, os.W_OK)):
        raise BadInput(f"--out {cfg.out!r} cannot be created: {base!r} is not a writable directory")
    return cfg


# Flags that --resume lets differ from the run's own: they change neither the run's past nor its meaning.
RESUMABLE = ("steps", "samples", "lr", "device", "save_interval", "resume")


def resume_config(given):
    """The Config of the run in --resume OUT: its saved flags, with those of RESUMABLE that are given."""
    out = given["resume"]
    if given.get("overwrite"):
        raise BadInput("--resume and --overwrite: choose one")
    saved = saved_flags(out)
    if saved is None:
        raise BadInput(f"--resume {out!r}: no dpg_min run there (no config.json); start one with --out")
    if not checkpoints(out):
        raise BadInput(f"--resume {out!r}: the run has no checkpoint yet; start it again with --overwrite")
    saved |= dict(out=out, resume=out, overwrite=False)
    if "out" in given and os.path.abspath(given["out"]) == os.path.abspath(out):
        given.pop("out")
    clash = [k for k, v in given.items() if k not in RESUMABLE and v != saved.get(k)]
    if clash:
        k = clash[0]
        raise BadInput(f"--resume {out!r}: --{k.replace('_', '-')} {given[k]} contradicts the run's "
                       f"{saved.get(k)!r}; drop it (only --{', --'.join(RESUMABLE[:-1]).replace('_', '-')} "
                       f"may change), or start a new run")
    cfg = Config(**saved | {k: given[k] for k in RESUMABLE if k in given})
    check_config(cfg)
    step, n_steps = checkpoints(out)[-1], n_steps_of(cfg, task_features(cfg)[1])
    if step >= n_steps:
        raise BadInput(f"--resume {out!r}: the run has finished its {step} steps; "
                       f"give --steps above {step} to train it further")
    return cfg


def check_config(cfg):
    """BadInput unless every flag of cfg makes sense, alone and together."""
    for name in ("batch_size", "forward_batch_size", "seq_len", "q_update_interval", "eval_interval",
                 "eval_samples", "lambda_samples", "diversity_samples", "samples", "steps", "ppo_epochs",
                 "ppo_minibatch", "kl_horizon", "grad_var_samples", "save_interval"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}")
    for name in ("lr", "kl_beta", "kl_target", "lambda_tol"):
        if not getattr(cfg, name) > 0:                              # `not >` also refuses NaN
            raise BadInput(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.grad_var_interval < 0:
        raise BadInput(f"--grad-var-interval must be 0 (never) or positive, got {cfg.grad_var_interval}")
    if cfg.method not in ("dpg", "reinforce", "ziegler"):
        raise BadInput(f"--method {cfg.method!r}: use dpg, reinforce or ziegler")
    if cfg.method == "ziegler" and cfg.batch_size % cfg.ppo_minibatch:
        raise BadInput(f"--batch-size {cfg.batch_size} is not divisible by --ppo-minibatch {cfg.ppo_minibatch}: "
                       f"PPO's minibatches must be equal (a short last one whitens too few advantages)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    _, mu_bar, _ = task_features(cfg)                               # checks task, moments and word list
    if cfg.method != "dpg" and any(m != 1 for m in mu_bar):
        raise BadInput(f"--method {cfg.method} needs a pointwise task (every moment 1): a reward cannot "
                       f"express the distributional constraint μ̄ = {mu_bar} (paper §4); use --method dpg")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["plot"]:
            return plot(argv[1:])
        cfg = parse_config(argv)
        features, _, wordlists = task_features(cfg)
        words = [f[5:] for f in features if f.startswith("word:")] + [w for ws in wordlists.values() for w in ws]
        a, tokenizer = load_lm(cfg.model, words)
        if T_max := getattr(a.config, "max_position_embeddings", None):
            if cfg.seq_len + 1 > T_max:
                raise BadInput(f"--seq-len {cfg.seq_len} is too long for {cfg.model} ({T_max} positions)")
        train(cfg, a, tokenizer)
    except BadInput as e:
        print(f"dpg_min.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NotFinite as e:
        last = checkpoints(cfg.out)
        if last:
            e = f"{e}. Its last good checkpoint is {cfg.out}/checkpoint-{last[-1]}: go on with --resume {cfg.out}"
        print(f"dpg_min.py: stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:                                         # `... | head` stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        sys.exit(0 if argv[:1] == ["plot"] else 1)                 # plot's figure is already written


if __name__ == "__main__":
    main()
