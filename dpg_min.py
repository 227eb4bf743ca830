"""dpg_min: GDC++ (KL-adaptive DPG with the baseline Z·π/q) in one readable file.

Korbak, Elsahar, Kruszewski, Dymetman. "On Reinforcement Learning and Distribution Matching for
Fine-Tuning Language Models with no Catastrophic Forgetting". NeurIPS 2022.

    python dpg_min.py --task amazing --baseline               # the paper's setting: GPT-2, on a GPU
    python dpg_min.py --task amazing --baseline --model tiny  # offline, on a laptop CPU, in about a minute
    python dpg_min.py plot RUN_DIR ... --out fig.png          # the paper's figures from the runs' logs

Distribution matching first writes down the target p(x) = P(x)/Z, an energy-based model on the original
LM a, P(x) = a(x)·φ_hard(x)·exp(λ·φ(x)), then trains π_θ to minimise D_KL(p‖π_θ) by Distributional Policy
Gradients (DPG). GDC++ subtracts the baseline Z·π_θ(x)/q(x) from DPG's weight P(x)/q(x): no bias
(Facts 1-2), and an advantage centred on zero (Fig. 2). Top to bottom: Config, the math (pure functions
of log-probs, checked exactly by toy_exact.py), LM plumbing, tasks and the EBM, evaluation, training
(Algorithm 1), the command line.
"""
import argparse, copy, json, math, os, random, re, shutil, sys, time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Config: the paper's GPT-2 setting. Each field is a flag (`batch_size` is `--batch-size`) whose help
# names the source of its default; its check sits beside it. GDC is the authors' released code.
# -----------------------------------------------------------------------------
GDC, METHODS = "naver/gdc@a59c5b7 rm_vs_dm/gdc/", ("dpg", "reinforce", "ziegler")

def arg(default, help, ok=None, must=""):
    return field(default=default, metadata=dict(help=help, ok=ok, must=must))

def count(default, help):
    return arg(default, help, lambda v: v > 0, "a positive integer")

def positive(default, help):
    return arg(default, help, lambda v: 0 < v < math.inf, "a positive finite number")    # refuses NaN too

@dataclass
class Config:
    # task (paper §4.2)
    task: str = arg("amazing", "amazing, wikileaks, politics, science, positive, negative, female, topics, "
                               "hybrid-sports or hybrid-politics (tasks 1-10)")
    word: str = arg("", "custom constraint: the word W must occur (case-sensitive)", re.compile(r"\w+").fullmatch,
                    "one word of letters and digits")
    wordlist: str = arg("", "custom constraint: a file of words, one per line, one must occur")
    moments: str = arg("", "target moments μ̄, one per feature, comma-separated (0 or 1: a hard constraint)")
    classifier: str = arg("distilbert/distilbert-base-uncased-finetuned-sst-2-english", "tasks positive and "
                          "negative: an HF classifier with labels POSITIVE/NEGATIVE, or tiny (random, offline)")
    # method (paper §4.3)
    method: str = arg("dpg", "dpg (Algorithm 1); reinforce (eq. 1, R = φ); ziegler (eq. 2, by PPO)",
                      lambda v: v in METHODS, "dpg, reinforce or ziegler")
    baseline: bool = arg(False, "dpg: GDC++, the baseline Z·π/q (Algorithm 1 line 5; without it, GDC); "
                                "reinforce: the batch-mean reward (eq. 12)")
    # model and sampling
    model: str = arg("gpt2", "a: an HF name or path (paper: gpt2), or tiny (random, built in code, offline)")
    seq_len: int = count(40, f"T, tokens sampled after BOS ({GDC}configs/gdc++)")
    # optimisation
    batch_size: int = count(512, f"B, samples per gradient step ({GDC}configs/gdc++)")
    forward_batch_size: int = count(32, f"rows per forward pass, in sampling and training: bounds memory, "
                                        f"changes results only by rounding ({GDC}configs/gdc++)")
    samples: int = count(None, f"training samples ({GDC}configs/gdc++: 6.4M pointwise, else 8.4M)")
    steps: int = count(None, "gradient steps; overrides --samples")
    lr: float = positive(1.41e-5, f"Adam's learning rate ({GDC}configs/gdc++)")
    warmup: int = arg(100, f"steps of linear warm-up ({GDC}configs/gdc++)", lambda v: v >= 0, "0 or more")
    q_update_interval: int = count(10, "K: every K steps, Ẑ on K·B fresh samples of q, maybe q ← π (Alg. 1)")
    # Ziegler: PPO with an adaptive KL penalty, as GDC's fork of trl (gdc/ppo.py, configs/ppo/PPO.json)
    ppo_epochs: int = count(1, "ziegler: passes over each batch")
    ppo_minibatch: int = count(32, "ziegler: samples per PPO minibatch, one Adam step each")
    kl_beta: float = positive(0.2, "ziegler: initial KL coefficient β")
    kl_target: float = positive(6.0, "ziegler: β adapts so that a batch's KL(π‖a) nears this")
    kl_horizon: int = count(10000, "ziegler: β's adaptation horizon, in samples")
    # the EBM (paper §4.1)
    lambda_samples: int = count(10240, f"samples of a to fit λ ({GDC}configs/gdc++)")
    lambda_tol: float = positive(0.01, f"fit λ until ‖μ̄ − μ̂‖₂ < this ({GDC}gdc/gdc.py L526-606)")
    # evaluation and output
    eval_interval: int = count(10, f"evaluate π every this many steps ({GDC}configs/gdc++)")
    eval_samples: int = count(2048, f"samples of π per evaluation ({GDC}configs/gdc++)")
    diversity_samples: int = count(500, f"Distinct-n, Self-BLEU-n on this many of them ({GDC}gdc/metrics.py)")
    grad_var_interval: int = arg(0, "every this many steps, Var(G) (§4.5, eq. 18; a backward pass per "
                                    "sample); 0: never", lambda v: v >= 0, "0 (never) or positive")
    grad_var_samples: int = count(64, "samples of the batch for Var(G)")
    seed: int = arg(12, f"random seed ({GDC}configs/gdc++)")
    out: str = arg("", "output folder, new or empty (default: a new runs/TASK-METHOD-MODEL-DATE-TIME)")
    save_interval: int = count(100, "write OUT/checkpoint.pt every this many steps and at the end")
    resume: str = arg("", "continue the run in this folder from its checkpoint")
    overwrite: bool = arg(False, "replace the earlier run in --out")
    device: str = arg("", "cuda or cpu (default: cuda if available)",
                      lambda v: not v.startswith("cuda") or torch.cuda.is_available(), "cpu (CUDA is not available here)")

# `--model tiny` presets (README "Quick start"); flags override them. A random tiny model is far from
# GPT-2: it wants a larger learning rate and far fewer samples.
TINY = dict(seq_len=20, batch_size=128, forward_batch_size=128, steps=240, lr=1e-3, warmup=0,
            eval_interval=20, eval_samples=1024, lambda_samples=4096, diversity_samples=100, classifier="tiny")

class BadInput(Exception):      # a user error: `main` prints one line and exits with 2, having written nothing
    pass

class NotFinite(Exception):     # a NaN or ±inf met before an update: `main` prints it and exits with 1
    pass

# -----------------------------------------------------------------------------
# Math: losses and estimators, pure functions of per-sequence log-probs
#   logp_pi = log π_θ(x) (the only tensor with a gradient), logp_q = log q(x) (the proposal x came
#   from), logp_a = log a(x), log_P = log P(x) (−inf where P(x) = 0), Z = Σ_x P(x) (a number ≥ 0).
# All in log space until the last moment: sequence log-ratios reach hundreds of nats, and exp
# overflows float32 at 88 nats, float64 at 709.
# -----------------------------------------------------------------------------

def log_of(Z, like):
    """log Z as a detached 0-dim tensor like `like` (Z may be a Python float); log 0 = −inf."""
    return torch.log(torch.as_tensor(Z, dtype=like.dtype, device=like.device)).detach()

def dpg_advantage(logp_pi, logp_q, log_P, Z, baseline):
    """A(x) = P(x)/q(x) − Z·π_θ(x)/q(x)  (GDC++: Algorithm 1 line 5, eq. 15), or P(x)/q(x) (GDC, eq. 5).
    Paper: the baseline adds no bias (Fact 2): E_q[(π/q)∇log π] = Σ_x ∇π(x) = 0. Detached, π/q too (as GDC
    gdc/gdc.py L693); as exps of log-ratios, P = 0 or Z = 0 give exact zeros, never 0·inf."""
    logp_pi, logp_q, log_P = logp_pi.detach(), logp_q.detach(), log_P.detach()
    A = torch.exp(log_P - logp_q)
    return A - torch.exp(log_of(Z, logp_q) + logp_pi - logp_q) if baseline else A

def dpg_loss(logp_pi, logp_q, log_P, Z, baseline):
    """(loss, A) on x_1..x_B ~ q:  ∇loss = −(1/B) Σ_i A(x_i)·∇log π_θ(x_i)   (eqs. 3-5; Algorithm 1 line 5).
    Paper: E_q[(P/q)∇log π] = −Z·∇D_KL(p‖π_θ). Only the gradient means anything, not the value."""
    A = dpg_advantage(logp_pi, logp_q, log_P, Z, baseline)
    return -(A * logp_pi).mean(), A

def reinforce_loss(logp_pi, R):
    """(loss, A = R) on x_1..x_B ~ π_θ, where ∇loss = −(1/B) Σ_i R(x_i)·∇log π_θ(x_i)   (eq. 1: ∇E_π R)."""
    return -(R.detach() * logp_pi).mean(), R.detach()

def kl_control_reward(r, logp_pi, logp_a, beta):
    """R^z_θ(x) = r(x) − β·log(π_θ(x)/a(x))  (eq. 2). Theorem 1: E_π R^z = β·(log Z_z − D_KL(π_θ‖p_z)),
    p_z ∝ a·e^{r/β}. Not detached: its own gradient vanishes in expectation (footnote 3; toy_exact.py)."""
    return r - beta * (logp_pi - logp_a)

def kl_penalty_rewards(logp_pi_t, logp_a_t, R, beta):
    """Per-token rewards (B, T): r_t = −β·(log π(y_t|·) − log a(y_t|·)), plus R(x) at t = T, so Σ_t r_t is
    R^z(x) of eq. 2: PPO sees the KL at every token and the score once (GDC gdc/ppo.py L301-307)."""
    r = -beta * (logp_pi_t - logp_a_t).detach()
    return torch.cat([r[:, :-1], r[:, -1:] + R.detach().to(r.dtype)[:, None]], dim=1)

def gae(r, V, gamma=1.0, lam=0.95):
    """GAE (Schulman et al. 2016) of rewards r, values V (B, T): δ_t = r_t + γV_{t+1} − V_t, V_{T+1} = 0,
    A_t = δ_t + γλ·A_{t+1}. Returns (A, A + V), advantages and value targets. γ, λ as GDC gdc/ppo.py."""
    A, next_A, next_V = torch.zeros_like(r), torch.zeros_like(r[:, 0]), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        next_A = r[:, t] + gamma * next_V - V[:, t] + gamma * lam * next_A
        A[:, t], next_V = next_A, V[:, t]
    return A, A + V

def ppo_loss(logp, logp_old, A, V, V_old, returns, clip=0.2, vf_coef=0.1):
    """PPO-clip with a clipped value loss (Schulman et al. 2017; GDC gdc/ppo.py L309-367), per token:
        ρ = π/π_old,  L^π = E max(−Aρ, −A·clip(ρ, 1 ± ε)),  L^V = ½E max((V − G)², (V_old + clip(V − V_old, ±ε) − G)²).
    The clips keep each update near the policy that sampled the batch. Returns (L^π + c·L^V, ρ)."""
    ratio = torch.exp(logp - logp_old.detach())
    policy = torch.max(-A.detach() * ratio, -A.detach() * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    V_clipped = V_old + torch.clamp(V - V_old, -clip, clip)
    return policy + vf_coef * 0.5 * torch.max((V - returns) ** 2, (V_clipped - returns) ** 2).mean(), ratio

def adaptive_beta(beta, kl, target, horizon, n):
    """β ← β·(1 + clip(kl/target − 1, ±0.2)·n/horizon) after n samples of mean log(π/a) = kl: β grows when
    π drifts further from a than the target (Ziegler et al. 2019; GDC gdc/ppo.py L53-67)."""
    return beta * (1 + min(max(kl / target - 1, -0.2), 0.2) * n / horizon)

def grad_variance(params, loss_of, n):
    """Var(G) = E‖G(x)‖² − ‖E G(x)‖²  (paper eqs. 17-18) over n samples, G(x_j) = ∇loss_of(j).
    A backward pass per sample, keeping Σ G and Σ‖G‖²: the memory of two gradients for any n."""
    params, total, sq = [p for p in params if p.requires_grad], 0.0, 0.0
    for j in range(n):
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss_of(j), params)]).double()
        total, sq = total + g, sq + (g @ g).item()
    return sq / n - (total @ total).item() / n ** 2

def estimate_Z(log_P, logp_q):
    """Ẑ = (1/N) Σ_i P(x_i)/q(x_i) on x_i ~ q: unbiased, E_q[P/q] = Z (eq. 13). One logsumexp, no overflow."""
    return torch.exp(torch.logsumexp(log_P - logp_q, dim=0) - math.log(len(log_P)))

def kl_p_m(log_P, logp_q, logp_m, Z):
    """D_KL(p‖m) ≈ (1/N) Σ_i (p(x_i)/q(x_i))·(log p(x_i) − log m(x_i)), p = P/Ẑ, x_i ~ q  (§4.2 metric 2).
    P = 0 adds 0; Z = 0 gives +inf. How it differs from GDC's when Ẑ is a running mean: README, deviations."""
    log_Z = log_of(Z, log_P)
    log_p = torch.where(log_P == -math.inf, log_P, log_P - log_Z)      # stays −inf when Z = 0, not NaN
    weight = torch.exp(log_p - logp_q - math.log(len(log_p)))           # p/(N·q)
    terms = torch.where(log_p == -math.inf, torch.zeros_like(weight), weight * (log_p - logp_m))
    return torch.where(log_Z > -math.inf, terms.sum(), math.inf)

def tvd_p_m(log_P, logp_q, logp_m, Z):
    """TVD(p, m) = ½·E_q|p/q − m/q| on x_i ~ q (eq. 21). With m = π, E_q|A| = 2·Z·TVD(p, π) (§4.5)."""
    log_Z, log_N = log_of(Z, log_P), math.log(len(log_P))
    log_p = torch.where(log_P == -math.inf, log_P, log_P - log_Z)
    terms = torch.abs(torch.exp(log_p - logp_q - log_N) - torch.exp(logp_m - logp_q - log_N))
    return torch.where(log_Z > -math.inf, 0.5 * terms.sum(), math.inf)

def kl_reverse(logp_m, logp_a):
    """D_KL(m‖a) ≈ (1/N) Σ_i (log m(x_i) − log a(x_i)) on exact samples x_i ~ m (§4.2 metric 3)."""
    return (logp_m - logp_a).mean()

def ess(log_w):
    """Kish's effective sample size (Σw)²/Σw² of w = exp(log_w): N if all equal, 1 if one dominates, 0 if none."""
    return 0.0 if torch.all(log_w == -math.inf) else torch.exp(
        2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)).item()

def fit_lambdas(phi, log_w, mu_bar, tol=1e-2, max_iters=1000):
    """λ such that p ∝ w·exp(λ·φ) has E_p φ = μ̄ (eq. 16), by SNIS on N samples: φ (N, k), log w (N,).
    Paper §4.1: p is then the I-projection of a on {E φ = μ̄}, and λ maximises the concave dual
    g(λ) = λ·μ̄ − log Σ_j w_j e^{λ·φ_j} (∇g = μ̄ − μ̂(λ), ∇²g = −Cov φ): Newton steps, backtracking.
    Returns (λ, μ̂(λ)); the caller checks ‖μ̄ − μ̂‖."""
    keep = log_w > -math.inf                                            # samples that p can hold at all
    phi, log_w = phi[keep].to(log_w.dtype), log_w[keep]
    mu_bar = torch.as_tensor(mu_bar, dtype=log_w.dtype, device=log_w.device).reshape(-1)
    assert phi.shape[1:] == mu_bar.shape, f"phi must be (N, {len(mu_bar)}), got {tuple(phi.shape)}"
    for i in range(phi.shape[1]):    # a moment moves only between the feature's extremes in the sample
        lo, hi = (phi[:, i].min().item(), phi[:, i].max().item()) if len(phi) else (0.0, 0.0)
        if lo == hi and mu_bar[i].item() != lo:
            raise ValueError(f"feature {i} {'never fires' if hi == 0 else f'takes the single value {hi:g}'} in the "
                             f"{len(phi)} samples, so its moment cannot reach {mu_bar[i].item():g}: draw more samples")

    def dual(lam):
        return lam @ mu_bar - torch.logsumexp(log_w + phi @ lam, dim=0)

    lam = torch.zeros_like(mu_bar)
    for _ in range(max_iters):
        omega = torch.softmax(log_w + phi @ lam, dim=0)                 # (N,) SNIS weights
        grad, centred = mu_bar - omega @ phi, phi - omega @ phi
        if torch.linalg.vector_norm(grad) < tol:
            break
        step = torch.linalg.pinv(centred.T @ (omega[:, None] * centred)) @ grad     # Newton: −∇²g⁻¹·∇g
        step = step if bool(step @ grad > 0) else grad                  # flat directions: plain gradient
        g0, t = dual(lam), 1.0          # backtrack until g does not fall, give or take rounding near the top
        while dual(lam + t * step) < g0 - 64 * torch.finfo(g0.dtype).eps * (1 + g0.abs()) and t > 1e-12:
            t /= 2
        lam = lam + t * step
    return lam, torch.softmax(log_w + phi @ lam, dim=0) @ phi

def q_check_estimates(log_P, logp_q, logp_pi, Z_hat):
    """What Algorithm 1 lines 7-10 decide with, on fresh samples of q: KL̂(p‖π), KL̂(p‖q), TVD̂(p, π), ESS/N."""
    return dict(kl_p_pi=kl_p_m(log_P, logp_q, logp_pi, Z_hat).item(), kl_p_q=kl_p_m(log_P, logp_q, logp_q, Z_hat).item(),
                tvd_p_pi=tvd_p_m(log_P, logp_q, logp_pi, Z_hat).item(), ess_q=ess(log_P - logp_q) / len(log_P))

def batch_stats(A, log_P, logp_q, logp_pi, Z_hat, dpg):
    """The batch's advantage: mean, E|A|, Var(A) (eqs. 19-20); for DPG its parts P/q and Ẑ·π/q (Fig. 2)."""
    return dict(mean_A=A.mean().item(), mean_abs_A=A.abs().mean().item(), var_A=A.var(unbiased=False).item(),
                mean_P_q=torch.exp(log_P - logp_q).mean().item() if dpg else None,
                mean_Zpi_q=Z_hat * torch.exp(logp_pi - logp_q).mean().item() if dpg else None)

# -----------------------------------------------------------------------------
# LM plumbing. A sequence is BOS then T generated tokens, ids (B, T + 1); BOS only conditions, so
# log m(x) = Σ_{t=1..T} log m(y_t | BOS, y_<t). No EOS stop: all have T tokens, as in GDC. Every
# forward pass, sampling included, takes at most --forward-batch-size rows.
# -----------------------------------------------------------------------------

@torch.no_grad()
def sample(model, n, T, bos_id, chunk=256):
    """n exact ancestral samples of T tokens, in chunks of `chunk`: ids (n, T + 1) and log m(x) (n,) float64.
    Not `generate`: in transformers v5 it applies top-k = 50 and stops at EOS, another distribution, so every
    P/q would be wrong. Each token is an inverse-CDF draw (half the cost of torch.multinomial), exact."""
    device, all_ids, all_logp = next(model.parameters()).device, [], []
    for start in range(0, n, chunk):
        ids = torch.full((min(chunk, n - start), 1), bos_id, dtype=torch.long, device=device)
        logp, past = torch.zeros(len(ids), dtype=torch.float64, device=device), None
        for _ in range(T):
            out = model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True, attention_mask=torch.ones_like(ids))
            past, log_probs = out.past_key_values, torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (b, vocab)
            cdf = log_probs.double().exp().cumsum(-1)
            u = torch.rand(len(ids), 1, dtype=torch.float64, device=device) * cdf[:, -1:]
            x = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)        # (b, 1)
            logp += log_probs.gather(1, x).squeeze(1).double()
            ids = torch.cat([ids, x], dim=1)
        all_ids.append(ids), all_logp.append(logp)
    return torch.cat(all_ids), torch.cat(all_logp)

def token_logprobs(model, ids, v_head=None):
    """log m(y_t | BOS, y_<t) (B, T) of ids (B, T + 1); with PPO's value head also V(s_t) (B, T), read on the
    hidden state before each token, BOS included (GDC gdc/ppo.py L283). Differentiable."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=v_head is not None)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    return logp if v_head is None else (logp, v_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1))

def sequence_logprob(model, ids, chunk=256):
    """log m(x) (B,) float64: the sum, not the mean, of the T token log-probs, in chunks of `chunk` rows."""
    return torch.cat([token_logprobs(model, ids[i:i + chunk]).double().sum(1) for i in range(0, len(ids), chunk)])

def build_tiny(words, seed=0, n_layer=2, n_embd=64, n_head=2, max_len=64, labels=None):
    """A small random GPT-2 with a word-level tokenizer (BOS = EOS = PAD id 0, <unk> 1, then `words`), built
    in code from `seed`: nothing to download. With `labels`, a sequence classifier instead (tasks 5-6)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast
    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>")
    config = GPT2Config(vocab_size=len(vocab), n_positions=max_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, id2label=dict(enumerate(labels or [0, 1])))
    with torch.random.fork_rng(devices=[]):                 # seed the construction, not the caller's RNG
        torch.manual_seed(seed)
        model = (GPT2ForSequenceClassification if labels else GPT2LMHeadModel)(config)
    return model.eval(), PreTrainedTokenizerFast(tokenizer_object=core, **special)

def tiny_vocab(extra=(), size=1000):
    """The words of `--model tiny`: every task word, the custom `extra` ones, then made-up fillers ("baba",
    ...) up to `size`. A near-uniform model says a given word in ~2% of 20-token samples."""
    words = list(dict.fromkeys(["amazing", "WikiLeaks", *FEMALE, *MALE, *extra, *sum(WORDLISTS.values(), ())]))
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    filler = [s + t for s in syllables for t in syllables if s + t not in {w.lower() for w in words}]
    return words + filler[:max(0, size - len(words))]

def from_pretrained(auto_class, name, flag):
    """transformers' `auto_class` model and its tokenizer, by HF name or path, or one line of BadInput."""
    import transformers
    transformers.utils.logging.set_verbosity_error()        # no retry chatter: one line if it fails
    try:
        return getattr(transformers, auto_class).from_pretrained(name).eval(), transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(f"cannot load {flag} {name!r} ({why}); with no network, use {flag} tiny") from None

def load_lm(name, extra_words=()):
    """The original LM a and its tokenizer: an HF model, or the offline tiny one."""
    return build_tiny(tiny_vocab(extra_words)) if name == "tiny" else from_pretrained("AutoModelForCausalLM", name, "--model")

def load_classifier(name, device):
    """Tasks 5-6: a transformers "text-classification" pipeline with labels POSITIVE and NEGATIVE. (The
    paper's PPLM head on GPT-2 medium, GDC gdc/scorer.py, is not on the model hub.)"""
    import transformers
    if name == "tiny":
        model, tokenizer = build_tiny(tiny_vocab(), seed=1, labels=("NEGATIVE", "POSITIVE"))
    else:
        model, tokenizer = from_pretrained("AutoModelForSequenceClassification", name, "--classifier")
    labels = [str(v) for v in model.config.id2label.values()]
    if not {"pos", "neg"} <= {v.lower()[:3] for v in labels}:
        raise BadInput(f"--classifier {name!r} has labels {labels}, not positive and negative: use a sentiment model")
    if tokenizer.pad_token is None:                                 # GPT-2-like classifiers have none
        tokenizer.pad_token, model.config.pad_token_id = tokenizer.eos_token, tokenizer.eos_token_id
    return transformers.pipeline("text-classification", model=model, tokenizer=tokenizer, device=device)

# -----------------------------------------------------------------------------
# Tasks (paper §4.2) and the EBM (§4.1). A feature is "word:W" (the word W exactly as written, so
# "wikileaks" is not "WikiLeaks"), "list:NAME" (a word of the list, lowercased), "female" (more female
# than male pronouns, lowercased) or "sentiment:positive|negative" (the classifier's label). Words are
# maximal runs of letters and digits: "amazing," holds "amazing", "amazingly" does not.
# -----------------------------------------------------------------------------
WORDLISTS = {name: tuple(words.split()) for name, words in dict(      # ours (the paper used PPLM's lists)
    politics="government election senate congress parliament president minister policy vote voters campaign "
             "democracy law legislation party tax reform diplomat treaty governor",
    science="science scientist research experiment physics chemistry biology laboratory theory molecule atom "
            "quantum genome telescope evolution cell energy scientists",
    art="art artist painting painter sculpture museum gallery canvas poetry poet novel theatre composer exhibition "
        "portrait",
    sports="football soccer basketball tennis baseball hockey athlete coach team championship league olympic "
           "tournament stadium",
    business="business company market economy investor profit revenue startup shares stock bank finance trade "
             "industry").items()}
FEMALE, MALE = ("she", "her", "hers", "herself"), ("he", "him", "his", "himself")
TASKS = dict(                                                       # task → [(feature, μ̄)], tasks 1-10
    amazing=[("word:amazing", 1.0)], wikileaks=[("word:WikiLeaks", 1.0)],
    politics=[("list:politics", 1.0)], science=[("list:science", 1.0)],
    positive=[("sentiment:positive", 1.0)], negative=[("sentiment:negative", 1.0)],
    female=[("female", 0.5)], topics=[(f"list:{t}", 0.25) for t in ("science", "art", "sports", "business")],
    **{"hybrid-sports": [("female", 0.5), ("list:sports", 1.0)],
       "hybrid-politics": [("female", 0.5), ("list:politics", 1.0)]})

def feature(name, text, wordlists=WORDLISTS):
    """φ(x) ∈ {0, 1} of one decoded text for the feature `name` (see the section's comment)."""
    tokens, (kind, _, arg) = re.findall(r"\w+", text), name.partition(":")
    lower = [t.lower() for t in tokens]
    if kind in ("word", "list", "female"):
        return float(arg in tokens if kind == "word" else not set(wordlists[arg]).isdisjoint(lower) if kind == "list"
                     else sum(t in FEMALE for t in lower) > sum(t in MALE for t in lower))
    raise ValueError(f"unknown feature {name!r}: use word:W, list:NAME or female")

def phi_matrix(features, texts, wordlists=WORDLISTS, classify=None):
    """φ of N texts for k features, (N, k) float; sentiment features ask the `classify` pipeline."""
    labels = [r["label"].lower()[:3] for r in classify(texts, batch_size=32, truncation=True)] if classify else []
    columns = [[float(label == f[10:13]) for label in labels] if f.startswith("sentiment:")
               else [feature(f, x, wordlists) for x in texts] for f in features]
    return torch.tensor(columns, dtype=torch.float32).T.reshape(len(texts), len(features))

def load_task(cfg):
    """(features, μ̄, word lists) of the task that cfg asks for: read and checked once per run."""
    wordlists, task = dict(WORDLISTS), [(f"word:{cfg.word}", 1.0)] if cfg.word else []
    if cfg.wordlist:
        try:
            with open(cfg.wordlist, encoding="utf-8") as f:
                lines = [w.strip() for w in f]
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read --wordlist {cfg.wordlist!r} ({getattr(e, 'strerror', None) or e.reason}): "
                           f"give a UTF-8 file of words, one per line") from None
        bad = [i + 1 for i, w in enumerate(lines) if w and not w.startswith("#") and not re.fullmatch(r"\w+", w)]
        if bad or not any(w and not w.startswith("#") for w in lines):
            raise BadInput(f"--wordlist {cfg.wordlist!r} must hold one word (letters and digits) per line: "
                           + (f"line {bad[0]} is not one" if bad else "found no words"))
        wordlists[cfg.wordlist] = tuple(w.lower() for w in lines if w and not w.startswith("#"))
        task.append((f"list:{cfg.wordlist}", 1.0))
    if not task and cfg.task not in TASKS:
        raise BadInput(f"unknown task {cfg.task!r}: choose one of {', '.join(TASKS)}, or give --word or --wordlist")
    features, mu_bar = map(list, zip(*(task or TASKS[cfg.task])))
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

def log_P_of(logp_a, phi, mu_bar, lam):
    """log P(x) = log a(x) + λ·φ_soft(x), or −inf unless φ_i(x) = μ̄_i for every hard feature   (eq. 16).

    A feature with μ̄ ∈ {0, 1} is pointwise (§4.1): exp(λφ) would need λ = ±∞, so it is an exact factor of
    P and λ weighs only the others. Note: GDC (gdc/gdc.py L526-606) fits a finite λ to a hybrid task's
    μ̄ = 1 feature instead, which reaches a different p.
    """
    mu_bar = torch.as_tensor(mu_bar, dtype=phi.dtype, device=phi.device)
    hard = (mu_bar == 0) | (mu_bar == 1)
    log_P = logp_a + phi[:, ~hard].to(logp_a.dtype) @ lam.to(logp_a)
    return torch.where((phi[:, hard] == mu_bar[hard]).all(1), log_P, -math.inf)

# -----------------------------------------------------------------------------
# Evaluation (paper §4.2)
# -----------------------------------------------------------------------------

def tokens_of(text):
    """Word and punctuation tokens (the rule of nltk's wordpunct_tokenize, which needs no data)."""
    return re.findall(r"\w+|[^\w\s]+", text)

def distinct_n(texts, n):
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams, over all texts; 1: none repeats.
    Note: GDC (gdc/metrics.py L40-67) averaged a per-text ratio: repetition within a text, not across."""
    grams = [tuple(t[i:i + n]) for t in map(tokens_of, texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan

def self_bleu(texts, ns=(3, 4, 5)):
    """Self-BLEU-n (Zhu et al. 2018): the mean BLEU-n of each text against all the others, on word tokens,
    nltk's method1 smoothing; lower is more diverse, the cost quadratic. Note: GDC (gdc/metrics.py
    L70-148) passed raw strings to nltk, whose n-grams were then of characters."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    tokens = [tokens_of(t) for t in texts]
    if len(tokens) < 2:
        return [math.nan for _ in ns]
    scores = [sentence_bleu(tokens[:i] + tokens[i + 1:], hyp, [(1 / n,) * n for n in ns],
                            smoothing_function=SmoothingFunction().method1) for i, hyp in enumerate(tokens)]
    scores = [s if isinstance(s, list) else [s] * len(ns) for s in scores]   # nltk: a bare 0 if nothing matches
    return [sum(column) / len(scores) for column in zip(*scores)]

@torch.no_grad()
def evaluate(pi, score, n, T, bos, f, tokenizer, n_diverse):
    """E_π φ, D_KL(π‖a), Distinct-n and Self-BLEU-n on n exact samples of π (§4.2), and their texts.
    Note: GDC evaluated q, with top-p 0.9, on pointwise tasks; D_KL(π‖a) needs π's own samples."""
    ids, logp_pi = sample(pi, n, T, bos, f)
    logp_a, phi, _ = score(ids)
    texts = tokenizer.batch_decode(ids[:, 1:].tolist())
    bleu = self_bleu(texts[:n_diverse])
    return texts, dict(E_pi_phi=phi.mean(0).tolist(), kl_pi_a=kl_reverse(logp_pi, logp_a).item(),
                       **{f"distinct_{k}": distinct_n(texts[:n_diverse], k) for k in (1, 2, 3)},
                       **{f"self_bleu_{k}": b for k, b in zip((3, 4, 5), bleu)})

# -----------------------------------------------------------------------------
# Training: Algorithm 1, and the comparison methods of §4.3 in the same loop. Reinforce and Ziegler
# sample π instead of q; they differ from DPG in their update alone.
# -----------------------------------------------------------------------------

def method_name(cfg):
    if cfg.method == "dpg":
        return "GDC++" if cfg.baseline else "GDC"
    return "Ziegler" if cfg.method == "ziegler" else "Reinforce" + ("-baseline" if cfg.baseline else "")

def method_loss(cfg, logp_pi, logp_q, log_P, Z_hat, j):
    """(loss, A) of the samples j of a batch: the one place where DPG and Reinforce differ. Reinforce's
    reward is φ(x) = [P(x) > 0], its baseline the batch's mean reward (eq. 12)."""
    if cfg.method == "reinforce":
        R = (log_P > -math.inf).to(logp_pi.dtype)
        return reinforce_loss(logp_pi, (R - R.mean() if cfg.baseline else R)[j])
    return dpg_loss(logp_pi, logp_q[j], log_P[j], Z_hat, cfg.baseline)

def ppo_update(pi, v_head, a, ids, log_P, s, cfg, opt, sched, step):
    """Ziegler's update of a batch ids ~ π: per-token log π_old, V_old and GAE advantages of the KL-penalised
    rewards, held fixed; then --ppo-epochs passes in shuffled minibatches, an Adam step each. Returns A."""
    with torch.no_grad():
        chunks = [ids[i:i + cfg.forward_batch_size] for i in range(0, len(ids), cfg.forward_batch_size)]
        logp_old, V_old = map(torch.cat, zip(*[token_logprobs(pi, x, v_head) for x in chunks]))
        logp_a = torch.cat([token_logprobs(a, x) for x in chunks])
        A, returns = gae(kl_penalty_rewards(logp_old, logp_a, (log_P > -math.inf).double(), s["beta"]), V_old)
    check_finite(step, {"advantage A (GAE)": A})
    if cfg.grad_var_interval and step % cfg.grad_var_interval == 0:         # PPO's gradient at ρ = 1
        s["var_G"] = grad_variance(pi.parameters(), lambda j: -(A[j] * token_logprobs(pi, ids[j:j + 1])).sum(),
                                   min(len(ids), cfg.grad_var_samples))
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(ids), device=ids.device).split(cfg.ppo_minibatch):
            logp, V = token_logprobs(pi, ids[mb], v_head)
            A_mb = (A[mb] - A[mb].mean()) / torch.sqrt(A[mb].var() + 1e-8)     # whitened per minibatch, as GDC
            opt.zero_grad()
            ppo_loss(logp, logp_old[mb], A_mb, V, V_old[mb], returns[mb])[0].backward()
            check_finite(step, {"PPO gradient": grad_norm(opt)})
            opt.step(), sched.step()
    s["beta"] = adaptive_beta(s["beta"], (logp_old - logp_a).sum(1).mean().item(), cfg.kl_target, cfg.kl_horizon, len(ids))
    return A

def grad_norm(opt):
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in opt.param_groups[0]["params"] if p.grad is not None))

def check_finite(step, quantities):
    """Stop before an update would carry a NaN or ±inf into π: a weight P/q beyond e^709 is +inf in float64,
    and Adam would make NaN weights of it for good."""
    for name, x in quantities.items():
        if not torch.isfinite(x := torch.as_tensor(x)).all():
            raise NotFinite(f"step {step}: {name} is {'NaN' if x.isnan().any() else 'infinite'}, so π was not "
                            f"updated with it; lower --lr or check the task")

def n_steps_of(cfg, mu_bar):
    """--steps, or --samples / B (GDC configs/gdc++: 6.4M samples on pointwise tasks, else 8.4M)."""
    return cfg.steps or -(-(cfg.samples or (6_400_000 if set(mu_bar) <= {0, 1} else 8_400_000)) // cfg.batch_size)

def train(cfg, task, a, tokenizer, ckpt=None, log=print):
    """Fine-tune π from a toward p; write OUT/config.json, metrics.jsonl, checkpoint.pt and π. Returns π."""
    import transformers
    from tqdm import tqdm
    transformers.utils.logging.disable_progress_bar()
    (features, mu_bar, wordlists), device = task, cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    B, f, T, K, n_steps = cfg.batch_size, cfg.forward_batch_size, cfg.seq_len, cfg.q_update_interval, n_steps_of(cfg, mu_bar)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    classify = load_classifier(cfg.classifier, device) if any(x.startswith("sentiment:") for x in features) else None
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    # a is frozen; the proposal q and the policy π_θ start as a. All stay in eval mode, without dropout:
    # the π we differentiate must be the π that scored x (GDC never called .train() either).
    a = a.to(device).eval().requires_grad_(False)
    q, pi = copy.deepcopy(a), copy.deepcopy(a).requires_grad_(True)
    proposal = q if cfg.method == "dpg" else pi                         # Reinforce and Ziegler: on-policy
    v_head = torch.nn.Linear(pi.config.hidden_size, 1).to(device) if cfg.method == "ziegler" else None
    if v_head is not None:                                              # PPO's value head starts at V = 0
        torch.nn.init.zeros_(v_head.weight), torch.nn.init.zeros_(v_head.bias)
    opt = torch.optim.Adam(list(pi.parameters()) + (list(v_head.parameters()) if v_head else []), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, cfg.warmup)))

    def score(ids, lam):
        """log a(x), φ(x) and log P(x) of samples ids (N, T + 1)."""
        with torch.no_grad():
            logp_a = sequence_logprob(a, ids, f)
        phi = phi_matrix(features, tokenizer.batch_decode(ids[:, 1:].tolist()), wordlists, classify).to(device)
        return logp_a, phi, log_P_of(logp_a, phi, mu_bar, lam)

    soft, nan = [m for m in mu_bar if m not in (0, 1)], math.nan
    s = dict(step=-1, seconds=0.0, lam=torch.zeros(len(soft), dtype=torch.float64, device=device), Z_hat=0.0, rounds=0,
             q_updates=0, q_updated=False, beta=cfg.kl_beta if v_head else None, var_G=nan, m=None, kl_p_pi=nan,
             kl_p_q=nan, tvd_p_pi=nan, ess_q=nan, batch=dict(mean_A=nan, mean_abs_A=nan, var_A=nan))
    if soft and ckpt is None:        # λ by SNIS on samples of a = q, within the hard constraints (weight 0 outside)
        _, phi, log_P = score(sample(a, cfg.lambda_samples, T, bos, f)[0], s["lam"])
        try:
            s["lam"], mu_hat = fit_lambdas(phi[:, [m in soft for m in mu_bar]], torch.where(
                log_P > -math.inf, 0.0, -math.inf), soft, cfg.lambda_tol)
        except ValueError as e:
            raise BadInput(f"fitting λ on {cfg.lambda_samples} samples of a: {e}") from None
        log(f"λ = {fmt(s['lam'].tolist())} gives E_p φ ≈ {fmt(mu_hat.tolist())} for μ̄ = {fmt(soft)} "
            f"({cfg.lambda_samples} samples of a)")
        if torch.linalg.vector_norm(mu_hat - torch.tensor(soft, device=device).double()) >= cfg.lambda_tol:
            log(f"warning: λ did not reach the targets within --lambda-tol {cfg.lambda_tol}; training goes on")
    metrics = os.path.join(cfg.out, "metrics.jsonl")
    shutil.rmtree(cfg.out) if cfg.overwrite and os.path.isdir(cfg.out) else None   # only now: bad input wrote nothing
    pi.config.dpg_min = asdict(cfg)                                     # the run's flags, in OUT/config.json
    pi.config.save_pretrained(cfg.out)
    if ckpt is not None:                                                # --resume: back to where it was saved
        for obj, key in ((pi, "pi"), (q, "q"), (v_head, "v_head"), (opt, "opt"), (sched, "sched")):
            obj is not None and obj.load_state_dict(ckpt[key])
        for g in opt.param_groups:                                      # --lr may be new
            g["initial_lr"], g["lr"], sched.base_lrs = cfg.lr, cfg.lr * sched.lr_lambdas[0](sched.last_epoch), [cfg.lr]
        s, rng = ckpt["s"], ckpt["rng"]
        random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
        torch.cuda.set_rng_state_all(rng["cuda"]) if rng["cuda"] and torch.cuda.is_available() else None
        os.truncate(metrics, ckpt["metrics_bytes"])                     # drop what was logged after the save
        log(f"resumed from {cfg.out}/checkpoint.pt at step {s['step']}")
    log(f"{method_name(cfg)} on {', '.join(features)} (μ̄ = {fmt(mu_bar)}), {cfg.model}, {n_steps} steps of "
        f"B = {B} samples of T = {T} tokens, on {device}")
    t0 = time.time() - s["seconds"]
    for step in tqdm(range(s["step"] + 1, n_steps + 1), initial=s["step"] + 1, total=n_steps + 1, disable=None):
        if step > 0:
            ids, logp_q = sample(proposal, B, T, bos, f)                # Algorithm 1 line 3: x_1..x_B ~ q
            logp_a, phi, log_P = score(ids, s["lam"])                   # line 4: log a(x), φ(x), log P(x)
            if cfg.method == "ziegler":                                 # PPO: its own minibatch steps
                A, logp_pi = ppo_update(pi, v_head, a, ids, log_P, s, cfg, opt, sched, step), logp_q
            else:
                if cfg.grad_var_interval and step % cfg.grad_var_interval == 0:     # §4.5, before the update
                    s["var_G"] = grad_variance(pi.parameters(), lambda j: method_loss(cfg, sequence_logprob(
                        pi, ids[j:j + 1]), logp_q, log_P, s["Z_hat"], slice(j, j + 1))[0], min(B, cfg.grad_var_samples))
                # line 5: the batch-mean gradient, accumulated over chunks of f samples, each weighted by
                # its share of B, so that any f gives the same step (GDC summed the chunks' means)
                opt.zero_grad()
                A, logp_pi = [], []
                for i in range(0, B, f):
                    logp_pi.append(sequence_logprob(pi, ids[i:i + f], f))
                    loss, A_i = method_loss(cfg, logp_pi[-1], logp_q, log_P, s["Z_hat"], slice(i, i + f))
                    (loss * len(A_i) / B).backward()
                    A.append(A_i)
                A, logp_pi = torch.cat(A), torch.cat(logp_pi).detach()
                check_finite(step, {"advantage A": A, "gradient norm": grad_norm(opt)})
                opt.step(), sched.step()                                # line 6: θ ← θ + α·∇
            s["batch"] = batch_stats(A, log_P, logp_q, logp_pi, s["Z_hat"], proposal is q)
        if step % K == 0 or step == n_steps:
            # lines 7-10, on K·B fresh samples of q (the batch would judge π on what it was just fitted to).
            # Ẑ is the equal-weight mean of every round's estimate, each unbiased (eq. 13), as GDC's.
            ids, logp_q = sample(q, K * B, T, bos, f)
            _, _, log_P = score(ids, s["lam"])
            check_finite(step, {"Ẑ of this round": (Z_round := estimate_Z(log_P, logp_q).item())})
            s["Z_hat"], s["rounds"] = (Z_round + s["rounds"] * s["Z_hat"]) / (s["rounds"] + 1), s["rounds"] + 1
            with torch.no_grad():
                s.update(q_check_estimates(log_P, logp_q, sequence_logprob(pi, ids, f), s["Z_hat"]))
            if Z_round == 0:
                log(f"step {step}: no sample of q has P(x) > 0 among {K * B}, so this round adds 0 to Ẑ")
            if proposal is q and step > 0 and s["kl_p_pi"] < s["kl_p_q"]:      # never while Ẑ = 0: both inf
                q.load_state_dict(pi.state_dict())                      # q ← π
                s["q_updates"], s["q_updated"] = s["q_updates"] + 1, True
        s["step"], s["seconds"] = step, time.time() - t0
        if step % cfg.eval_interval == 0 or step == n_steps:
            s["m"] = log_metrics(cfg, s, *evaluate(pi, lambda x: score(x, s["lam"]), cfg.eval_samples, T, bos, f,
                                                   tokenizer, cfg.diversity_samples), n_steps, metrics, log)
        if step % cfg.save_interval == 0 or step == n_steps:
            save_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), pi=pi.state_dict(), q=q.state_dict(), s=s,
                            v_head=v_head and v_head.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                            rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                                     cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
                            metrics_bytes=os.path.getsize(metrics))
    pi.save_pretrained(cfg.out), tokenizer.save_pretrained(cfg.out)
    log(f"saved π to {cfg.out}: load it with AutoModelForCausalLM.from_pretrained({cfg.out!r})")
    return pi, s["m"]

def read_checkpoint(out):
    """OUT/checkpoint.pt (mapped, not read, until used), or one line of BadInput if missing or damaged."""
    if not os.path.exists(path := os.path.join(out, "checkpoint.pt")):
        raise BadInput(f"--resume {out!r}: the run has no checkpoint yet; start it again with --overwrite")
    try:                                            # weights_only=False: it holds RNG states, and we wrote it
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise BadInput(f"--resume {out!r}: checkpoint.pt is damaged ({type(e).__name__}); start again with --overwrite")

def save_checkpoint(path, **state):
    """One file, whole or not at all: torch.save to a temporary name, then an atomic os.replace."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)

def fmt(values):
    return "/".join(f"{round(v, 6) + 0.0:.3g}" for v in (values if isinstance(values, list) else [values]))

# (metrics.jsonl key, label): what a step's line prints, and what `plot` draws (Figs. 3, 5 and 2)
LABELS = dict(E_pi_phi="E_π φ", kl_p_pi="KL(p‖π)", kl_pi_a="KL(π‖a)", tvd_p_pi="TVD(p,π)", self_bleu_5="Self-BLEU-5",
              distinct_1="Distinct-1", Z_hat="Ẑ", mean_abs_A="mean|A|", var_A="Var(A)", var_G="Var(G)",
              q_updates="q updates", beta="β", mean_P_q="P/q", mean_Zpi_q="Ẑ·π/q", mean_A="mean A")

def log_metrics(cfg, s, texts, m, n_steps, path, log):
    """Print a step's line and 3 samples; append its metrics to OUT/metrics.jsonl (README, "Metrics")."""
    m = dict(step=s["step"], samples=s["step"] * cfg.batch_size, **m, kl_p_pi=s["kl_p_pi"], tvd_p_pi=s["tvd_p_pi"],
             kl_p_q=s["kl_p_q"], Z_hat=s["Z_hat"], **s["batch"], var_G=s["var_G"], ess_P_q=s["ess_q"],
             q_updated=s["q_updated"], q_updates=s["q_updates"], beta=s["beta"], seconds=round(s["seconds"], 1))
    shown = list(LABELS)[:9] + ["var_G"] * bool(cfg.grad_var_interval) + [{"dpg": "q_updates", "ziegler": "beta"}.get(cfg.method)]
    log(f"step {s['step']:>{len(str(n_steps))}}/{n_steps}  " + "  ".join(f"{LABELS[k]} {fmt(m[k])}" for k in shown if k)
        + f"  {m['seconds']:.0f}s" + "".join(f"\n    {text[:120]!r}" for text in texts[:3]))
    s["q_updated"], m = False, {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}
    with open(path, "a") as file:                                       # JSON has no NaN or inf: null
        file.write(json.dumps(m) + "\n")
    return m

# -----------------------------------------------------------------------------
# Command line: `python dpg_min.py [flags]` trains, `python dpg_min.py plot RUN_DIR ...` draws
# -----------------------------------------------------------------------------
RESUMABLE = ("steps", "samples", "lr", "device", "save_interval", "resume")   # change neither past nor task

def refuse(message):
    raise BadInput(message)

def saved_flags(out):
    """The Config fields of the run in folder OUT (OUT/config.json), or None if it holds no run."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            return {k: v for k, v in json.load(f)["dpg_min"].items() if k in {x.name for x in fields(Config)}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None

def parse_config(argv):
    """Config from the flags (`--model tiny` fills the unset ones from TINY); the output folder checked."""
    parser = argparse.ArgumentParser(prog="dpg_min.py", description=__doc__.split("\n\n")[0])
    parser.error = refuse                                               # one line, not the usage text
    for x in fields(Config):
        default = f" [default: {x.default}" + (f", tiny: {TINY[x.name]}]" if x.name in TINY else "]") if x.default else ""
        parser.add_argument("--" + x.name.replace("_", "-"), default=None, help=x.metadata["help"] + default,
                            **dict(action="store_true") if x.type is bool else dict(type=x.type, metavar=x.name.upper()))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if empty := [k for k, v in given.items() if v == ""]:
        refuse(f"--{empty[0].replace('_', '-')} \"\": give it a value, or leave the flag out")
    if out := given.get("resume"):
        if other := [k for k in given if k not in RESUMABLE and not (k == "out" and given[k] == out)]:
            refuse(f"--resume {out!r} with --{other[0].replace('_', '-')}: a run keeps its flags; only "
                   f"--{', --'.join(RESUMABLE[:-1]).replace('_', '-')} may be given anew")
        if (saved := saved_flags(out)) is None:
            refuse(f"--resume {out!r}: no dpg_min run there (no config.json); start one with --out")
        return Config(**{**saved, **given, "out": out, "overwrite": False})
    cfg = Config(**{**(TINY if given.get("model") == "tiny" else {}), **given})
    if not cfg.out:                                                     # a new folder for every run
        stem = os.path.join("runs", f"{'custom' if cfg.word or cfg.wordlist else cfg.task}-{method_name(cfg).lower()}-"
                                    f"{os.path.basename(cfg.model.rstrip('/'))}-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.out = next(o for o in [stem] + [f"{stem}-{i}" for i in range(2, 1000)] if not os.path.exists(o))
    if os.path.exists(cfg.out) and (not os.path.isdir(cfg.out) or os.listdir(cfg.out)):
        refuse(f"--out {cfg.out!r} already exists and is not an empty directory; choose a new one, or add --resume "
               f"{cfg.out} to continue its run, or --overwrite to replace it" if not cfg.overwrite else
               f"--overwrite: {cfg.out!r} holds no dpg_min run (no config.json), so it is left alone; choose another "
               f"--out") if not cfg.overwrite or saved_flags(cfg.out) is None else None
    base = os.path.abspath(cfg.out)                                     # the folder that OUT will be made in
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not (os.path.isdir(base) and os.access(base, os.W_OK)):
        refuse(f"--out {cfg.out!r} cannot be created: {base!r} is not a writable directory")
    return cfg

def check_config(cfg, mu_bar):
    """BadInput unless every flag passes the check beside its field, and the flags agree with each other."""
    for x in fields(cfg):
        if (v := getattr(cfg, x.name)) not in (None, "") and x.metadata["ok"] and not x.metadata["ok"](v):
            refuse(f"--{x.name.replace('_', '-')} must be {x.metadata['must']}, got {v}")
    if cfg.method == "ziegler" and cfg.batch_size % cfg.ppo_minibatch:
        refuse(f"--batch-size {cfg.batch_size} is not divisible by --ppo-minibatch {cfg.ppo_minibatch}: PPO's "
               f"minibatches must be equal (a short one whitens too few advantages)")
    if cfg.method != "dpg" and not set(mu_bar) <= {0, 1}:
        refuse(f"--method {cfg.method} needs a pointwise task (every moment 0 or 1): a reward cannot express "
               f"the distributional constraint μ̄ = {mu_bar} (paper §4); use --method dpg")

def plot(argv):
    """`dpg_min.py plot RUN_DIR ... --out FILE.png`: a panel per metric, a line per run (and feature), against
    training samples; then a Markdown table of the runs."""
    parser = argparse.ArgumentParser(prog="dpg_min.py plot", description=plot.__doc__.split(";")[0])
    parser.error = refuse
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of dpg_min.py runs")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="the figure to write (PNG, PDF, SVG)")
    parser.add_argument("--metrics", default="E_pi_phi,kl_p_pi,kl_pi_a,self_bleu_5,distinct_1,tvd_p_pi,mean_abs_A,"
                        "var_A,var_G", help=f"keys of metrics.jsonl, comma-separated: {', '.join(LABELS)}")
    parser.add_argument("--reach", type=float, default=0.5, help="the table's samples to E_π φ ≥ this (Fig. 4: 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args, runs = parser.parse_args(argv), []
    for path in args.runs:
        try:
            with open(os.path.join(path, "metrics.jsonl")) as f:
                runs.append((Config(**saved_flags(path)), [json.loads(line) for line in f]))
        except (OSError, ValueError, TypeError):
            refuse(f"{path!r} holds no dpg_min run (config.json and metrics.jsonl)")
    if os.path.exists(args.out) and not args.overwrite:
        refuse(f"--out {args.out!r} already exists; choose a new file, or add --overwrite")
    if not (keys := [k for k in args.metrics.split(",") if any(r.get(k) is not None for _, rows in runs for r in rows)]):
        refuse(f"--metrics {args.metrics!r}: none of these is logged by the runs; choose from {', '.join(LABELS)}")
    try:
        import matplotlib
        matplotlib.use("Agg")                                           # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        refuse("plot needs matplotlib, which is optional: pip install matplotlib")
    tasks, seeds, colours = {c.task for c, _ in runs}, list(dict.fromkeys(c.seed for c, _ in runs)), {}
    fig, axes = plt.subplots(-(-len(keys) // 3), min(3, len(keys)), squeeze=False,
                             figsize=(4.2 * min(3, len(keys)), 3.2 * -(-len(keys) // 3)))
    for c, rows in runs:                                                # a colour per method (and task), a style per seed
        name = f"{method_name(c)} B={c.batch_size}" + f" {c.task}" * (len(tasks) > 1)
        label, colour = name + f" seed {c.seed}" * (len(seeds) > 1), colours.setdefault(name, f"C{len(colours)}")
        for ax, key in zip(axes.flat, keys):
            xs, ys = zip(*[(r["samples"], r[key]) for r in rows if r.get(key) is not None]) or [(), ()]
            for i, y in enumerate(zip(*[v if isinstance(v, list) else [v] for v in ys])):   # E_π φ: one per feature
                many = isinstance(ys[0], list) and len(ys[0]) > 1
                ax.plot(xs, y, color=colour, linestyle=STYLES[(i if many else seeds.index(c.seed)) % 4],
                        label=label + f" φ{i + 1}" * many)
            ax.set(title=LABELS.get(key, key), xlabel="training samples", yscale="log" if key.startswith("var_") else "linear")
    [ax.axis("off") for ax in axes.flat[len(keys):]]
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=72)
    print(f"| run | samples | E_π φ | KL(p‖π) | KL(π‖a) | TVD(p,π) | Self-BLEU-5 | Distinct-1 | samples to E_π φ ≥ "
          f"{args.reach:g} | mean \\|A\\| | mean Var(A) | mean Var(G) |\n" + "|---" * 12 + "|")   # last: `| head` is fine
    for c, rows in runs:
        hit = next((r["samples"] for r in rows if fmt_first(r["E_pi_phi"]) >= args.reach), "never")
        means = [[r[k] for r in rows if r.get(k) is not None] for k in ("mean_abs_A", "var_A", "var_G")]
        print(f"| {method_name(c)} B={c.batch_size}" + f" {c.task}" * (len(tasks) > 1) + f" seed {c.seed}" * (len(seeds) > 1)
              + f" | {rows[-1]['samples']} | " + " | ".join(fmt(rows[-1][k]) if rows[-1][k] is not None else "inf" for k in
                                                         ("E_pi_phi", "kl_p_pi", "kl_pi_a", "tvd_p_pi", "self_bleu_5", "distinct_1"))
              + f" | {hit} | " + " | ".join(f"{sum(v) / len(v):.3g}" if v else "-" for v in means) + " |")
    print(f"wrote {args.out}")

STYLES = ["-", "--", ":", "-."]                                         # seeds, or the features of E_π φ

def fmt_first(v):
    return v[0] if isinstance(v, list) else v

def main(argv=None):
    argv, cfg = sys.argv[1:] if argv is None else argv, None
    try:
        if argv[:1] == ["plot"]:
            return plot(argv[1:])
        cfg = parse_config(argv)
        check_config(cfg, (task := load_task(cfg))[1])                  # the task is read once, here
        if (ckpt := read_checkpoint(cfg.out) if cfg.resume else None) and ckpt["s"]["step"] >= n_steps_of(cfg, task[1]):
            refuse(f"--resume {cfg.out!r}: the run has finished its {ckpt['s']['step']} steps; give --steps above "
                   f"{ckpt['s']['step']} to train it further")
        a, tokenizer = load_lm(cfg.model, [x[5:] for x in task[0] if x.startswith("word:")] + list(sum(task[2].values(), ())))
        if cfg.seq_len + 1 > getattr(a.config, "max_position_embeddings", math.inf):
            refuse(f"--seq-len {cfg.seq_len} is too long for {cfg.model} ({a.config.max_position_embeddings} positions)")
        from tqdm import tqdm
        train(cfg, task, a, tokenizer, ckpt, log=lambda line: (tqdm.write(line), sys.stdout.flush()))
    except BadInput as e:
        print(f"dpg_min.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NotFinite as e:
        if os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
            e = f"{e}. Its last good checkpoint is {cfg.out}/checkpoint.pt: go on with --resume {cfg.out}"
        print(f"dpg_min.py: stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:                                             # `... | head` stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0 if argv[:1] == ["plot"] else 1)                     # plot's figure is already written

if __name__ == "__main__":
    main()
