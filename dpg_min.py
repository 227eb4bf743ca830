"""dpg_min: GDC++ (KL-adaptive DPG with the baseline Z·π/q) in one readable file.

Korbak, Elsahar, Kruszewski, Dymetman, "On Reinforcement Learning and Distribution Matching for Fine-Tuning
Language Models with no Catastrophic Forgetting", NeurIPS 2022. Distribution matching writes down the target
p(x) = P(x)/Z, an energy-based model on the original LM a, P(x) = a(x)·φ_hard(x)·exp(λ·φ(x)), then trains π_θ to
minimise D_KL(p‖π_θ) by Distributional Policy Gradient (DPG). GDC++ subtracts the baseline Z·π_θ(x)/q(x) from
DPG's weight P(x)/q(x): no bias (Facts 1-2), and an advantage centred on zero (Fig. 2). Top to bottom: Config,
the math (pure functions of log-probs, checked exactly by toy_exact.py), LM plumbing, tasks and the EBM,
evaluation, training (Algorithm 1), the command line.
"""
import argparse, copy, json, math, os, random, re, shutil, sys, time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import transformers
from tqdm import tqdm

# --- Config: the paper's GPT-2 setting. Each field is a flag (`batch_size` is `--batch-size`), its check beside it;
# its help names the source of its default: "GDC++" is naver/gdc@a59c5b7 rm_vs_dm/gdc/configs/gdc++/*.json.
GDC, METHODS = "naver/gdc@a59c5b7 rm_vs_dm/gdc/", ("dpg", "reinforce", "ziegler")
POS, FIN = (lambda v: v > 0, "a positive integer"), (lambda v: 0 < v < math.inf, "a positive finite number")

def arg(default, help, check=(None, "")):
    return field(default=default, metadata=dict(help=help, ok=check[0], must=check[1]))

@dataclass
class Config:
    # task (paper §4.2)
    task: str = arg("amazing", "tasks 1-10: amazing, wikileaks, politics, science, positive, negative, female, "
                               "topics, hybrid-sports, hybrid-politics")
    word: str = arg("", "custom task: the word W must occur (case-sensitive)", (re.compile(r"\w+").fullmatch, "a word"))
    wordlist: str = arg("", "custom task: a file of words, one per line, one of which must occur")
    moments: str = arg("", "target moments μ̄, one per feature, comma-separated (0 or 1: a hard constraint)")
    classifier: str = arg("distilbert/distilbert-base-uncased-finetuned-sst-2-english", "tasks positive, negative: "
                          "an HF classifier with labels POSITIVE and NEGATIVE, or tiny (random, offline)")
    # method (paper §4.3)
    method: str = arg("dpg", "dpg (Alg. 1), reinforce (eq. 1) or ziegler (eq. 2)",
                      (METHODS.__contains__, "dpg, reinforce or ziegler"))
    baseline: bool = arg(False, "dpg: GDC++, with the baseline Z·π/q (Alg. 1 line 5); reinforce: E R (eq. 12)")
    # model and sampling
    model: str = arg("gpt2", "a: an HF causal LM: name, folder or .gguf file (paper: gpt2), or tiny (random, offline)")
    seq_len: int = arg(40, "T, tokens sampled after BOS (GDC++)", POS)
    # optimisation
    batch_size: int = arg(512, "B, samples per gradient step (GDC++)", POS)
    forward_batch_size: int = arg(32, "rows per forward pass, sampling too: bounds memory, not results (GDC++)", POS)
    samples: int = arg(None, "training samples (GDC++: 6.4M on pointwise tasks, else 8.4M)", POS)
    steps: int = arg(None, "gradient steps; overrides --samples", POS)
    lr: float = arg(1.41e-5, "Adam's learning rate (GDC++)", FIN)
    warmup: int = arg(100, "steps of linear warm-up (GDC++)", (lambda v: v >= 0, "0 or more"))
    q_update_interval: int = arg(10, "K: every K steps, Ẑ on K·B fresh samples of q, maybe q ← π (GDC++)", POS)
    # Ziegler: PPO with an adaptive KL penalty, as naver/gdc@a59c5b7 rm_vs_dm/gdc/gdc/ppo.py, configs/ppo/PPO.json
    ppo_epochs: int = arg(1, "ziegler: passes over each batch", POS)
    ppo_minibatch: int = arg(32, "ziegler: samples per PPO minibatch, an Adam step each", POS)
    kl_beta: float = arg(0.2, "ziegler: initial KL coefficient β", FIN)
    kl_target: float = arg(6.0, "ziegler: β adapts so that a batch's KL(π‖a) nears this", FIN)
    kl_horizon: int = arg(10000, "ziegler: β's adaptation horizon, in samples", POS)
    # the EBM (paper §4.1)
    lambda_samples: int = arg(10240, "samples of a to fit λ (GDC++)", POS)
    lambda_tol: float = arg(0.01, f"fit λ until ‖μ̄ − μ̂‖₂ < this ({GDC}gdc/gdc.py L526-606)", FIN)
    # evaluation and output
    eval_interval: int = arg(10, "evaluate π every this many steps (GDC++)", POS)
    eval_samples: int = arg(2048, "samples of π per evaluation (GDC++)", POS)
    diversity_samples: int = arg(500, f"Distinct-n and Self-BLEU-n on this many of them ({GDC}gdc/metrics.py)", POS)
    grad_var_interval: int = arg(0, "Var(G) every this many steps (§4.5; 0: never)", (lambda v: v >= 0, "0 or more"))
    grad_var_samples: int = arg(64, "samples of the batch for Var(G)", POS)
    seed: int = arg(12, "random seed (GDC++)")
    out: str = arg("", "output folder, new or empty (default: a new runs/TASK-METHOD-MODEL-DATE-TIME)")
    save_interval: int = arg(100, "write OUT/checkpoint.pt every this many steps, and at the end", POS)
    resume: str = arg("", "continue the run in this folder from its checkpoint")
    overwrite: bool = arg(False, "replace the earlier run in --out")
    device: str = arg("", "cuda or cpu (default: cuda if there is one)",
                      (lambda v: not v.startswith("cuda") or torch.cuda.is_available(), "cpu (there is no CUDA here)"))

# `--model tiny` presets (README, quick start), which flags override: a random tiny model wants a larger lr.
TINY = dict(seq_len=20, batch_size=128, forward_batch_size=128, steps=240, lr=1e-3, warmup=0, eval_interval=20,
            eval_samples=1024, lambda_samples=4096, diversity_samples=100, classifier="tiny")

class BadInput(Exception): pass      # a user error: `main` prints one line, exits with 2, has written nothing
class NotFinite(Exception): pass     # a NaN or ±inf met before an update: `main` prints it and exits with 1

# --- Math: pure functions of per-sequence log-probs logp_pi = log π_θ(x) (the only one with a gradient), logp_q =
# log q(x) (x's proposal), logp_a = log a(x), log_P = log P(x) (−inf where P = 0), and Z = Σ_x P(x). In log space
# until the last moment: sequence log-ratios reach hundreds of nats; exp overflows float32 at 88, float64 at 709.
def dpg_advantage(logp_pi, logp_q, log_P, Z, baseline):
    """A(x) = P(x)/q(x) − Z·π_θ(x)/q(x)  (GDC++: Algorithm 1 line 5, eq. 15), or P(x)/q(x) (GDC, eq. 5).
    No bias (Fact 2): E_q[(π/q)∇log π] = Σ_x ∇π(x) = 0. Detached, π/q included, as GDC gdc/gdc.py L693."""
    logp_pi, logp_q, log_P = logp_pi.detach(), logp_q.detach(), log_P.detach()
    A = torch.exp(log_P - logp_q)                       # exps of log-ratios: P = 0 or Z = 0 give exact zeros
    return A - torch.exp(logp_q.new_tensor(float(Z)).log() + logp_pi - logp_q) if baseline else A

def dpg_loss(logp_pi, logp_q, log_P, Z, baseline):
    """(loss, A) on x_1..x_B ~ q, where ∇loss = −(1/B) Σ_i A(x_i)·∇log π_θ(x_i)   (eqs. 3-5; Alg. 1 line 5).
    E_q[(P/q)∇log π] = −Z·∇D_KL(p‖π_θ): the gradient descends the KL; the loss's value means nothing."""
    A = dpg_advantage(logp_pi, logp_q, log_P, Z, baseline)
    return -(A * logp_pi).mean(), A

def reinforce_loss(logp_pi, R):
    """(loss, A = R) on x_1..x_B ~ π_θ, where ∇loss = −(1/B) Σ_i R(x_i)·∇log π_θ(x_i)  (eq. 1: = ∇E_π R)."""
    return -(R.detach() * logp_pi).mean(), R.detach()

def kl_control_reward(r, logp_pi, logp_a, beta):
    """R^z_θ(x) = r(x) − β·log(π_θ(x)/a(x))  (eq. 2); E_π R^z = β·(log Z_z − D_KL(π_θ‖p_z)), p_z ∝ a·e^{r/β}
    (Theorem 1). Not detached: its own gradient vanishes in expectation (footnote 3), as toy_exact.py checks."""
    return r - beta * (logp_pi - logp_a)

def kl_penalty_rewards(logp_pi_t, logp_a_t, R, beta):
    """r_t = −β·(log π(y_t|·) − log a(y_t|·)) + [t = T]·R(x), (B, T): Σ_t r_t = R^z(x) (eq. 2; GDC gdc/ppo.py L301)."""
    r = -beta * (logp_pi_t - logp_a_t).detach()
    return torch.cat([r[:, :-1], r[:, -1:] + R.detach().to(r.dtype)[:, None]], dim=1)

def gae(r, V, gamma=1.0, lam=0.95):
    """GAE (Schulman et al. 2016): A_t = δ_t + γλ·A_{t+1}, δ_t = r_t + γV_{t+1} − V_t; returns A and targets A + V."""
    A, next_A, next_V = torch.zeros_like(r), torch.zeros_like(r[:, 0]), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        next_A = r[:, t] + gamma * next_V - V[:, t] + gamma * lam * next_A
        A[:, t], next_V = next_A, V[:, t]
    return A, A + V

def ppo_loss(logp, logp_old, A, V, V_old, returns, clip=0.2, vf_coef=0.1):
    """PPO-clip with a clipped value loss (Schulman et al. 2017; GDC gdc/ppo.py L309-367), per token; returns (L, ρ):
    L = E max(−Aρ, −A·clip(ρ, 1±ε)) + c·½E max((V − G)², (V_old + clip(V − V_old, ±ε) − G)²), ρ = π/π_old."""
    ratio = torch.exp(logp - logp_old.detach())
    policy = torch.max(-A.detach() * ratio, -A.detach() * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    V_clipped = V_old + torch.clamp(V - V_old, -clip, clip)
    return policy + vf_coef * 0.5 * torch.max((V - returns) ** 2, (V_clipped - returns) ** 2).mean(), ratio

def adaptive_beta(beta, kl, target, horizon, n):
    """β ← β·(1 + clip(kl/target − 1, ±0.2)·n/horizon), n samples of mean log(π/a) = kl (GDC gdc/ppo.py L53)."""
    return beta * (1 + min(max(kl / target - 1, -0.2), 0.2) * n / horizon)

def grad_variance(params, loss_of, n):
    """Var(G) = E‖G(x)‖² − ‖E G(x)‖² (eqs. 17-18), G(x_j) = ∇loss_of(j), j < n: the memory of two gradients."""
    params, total, sq = [p for p in params if p.requires_grad], 0.0, 0.0
    for j in range(n):
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss_of(j), params)]).double()
        total, sq = total + g, sq + (g @ g).item()
    return sq / n - (total @ total).item() / n ** 2

def estimate_Z(log_P, logp_q):
    """Ẑ = (1/N) Σ_i P(x_i)/q(x_i), x_i ~ q: unbiased, E_q[P/q] = Z (eq. 13). One logsumexp: no overflow."""
    return torch.exp(torch.logsumexp(log_P - logp_q, dim=0) - math.log(len(log_P)))

def kl_p_m(log_P, logp_q, logp_m, Z):
    """D_KL(p‖m) ≈ −log Ẑ + (1/N) Σ_i (P(x_i)/(Ẑ·q(x_i)))·(log P(x_i) − log m(x_i)), x_i ~ q  (§4.2, metric 2), the
    form of GDC gdc/base_trainer.py L84-242 (why: README, "Deviations"). P = 0 adds 0; Z = 0 gives +inf."""
    log_Z = log_P.new_tensor(float(Z)).log()                           # −inf when Z = 0
    weight = torch.exp(torch.where(log_P > -math.inf, log_P - log_Z, log_P) - logp_q - math.log(len(log_P)))  # P/ẐNq
    terms = torch.where(log_P == -math.inf, torch.zeros_like(weight), weight * (log_P - logp_m))
    return torch.where(log_Z > -math.inf, terms.sum() - log_Z, math.inf)

def tvd_p_m(log_P, logp_q, logp_m, Z):
    """TVD(p, m) = ½·E_q|p/q − m/q|, x_i ~ q (eq. 21). With m = π, E_q|A| = 2·Z·TVD(p, π) (§4.5)."""
    log_Z, log_N = log_P.new_tensor(float(Z)).log(), math.log(len(log_P))
    log_p = torch.where(log_P == -math.inf, log_P, log_P - log_Z)
    terms = torch.abs(torch.exp(log_p - logp_q - log_N) - torch.exp(logp_m - logp_q - log_N))
    return torch.where(log_Z > -math.inf, 0.5 * terms.sum(), math.inf)

def kl_reverse(logp_m, logp_a):
    """D_KL(m‖a) ≈ (1/N) Σ_i (log m(x_i) − log a(x_i)) on exact samples x_i ~ m (§4.2, metric 3)."""
    return (logp_m - logp_a).mean()

def ess(log_w):
    """Kish's effective sample size (Σw)²/Σw² of w = exp(log_w): N if all equal, 1 if one dominates."""
    return 0.0 if torch.all(log_w == -math.inf) else (2 * log_w.logsumexp(0) - (2 * log_w).logsumexp(0)).exp().item()

def fit_lambdas(phi, log_w, mu_bar, tol=1e-2, max_iters=1000):
    """λ such that p ∝ w·exp(λ·φ) has E_p φ = μ̄ (eq. 16; the I-projection of a, §4.1), by SNIS on φ (N, k), log w
    (N,): Newton steps, backtracking, on the concave dual g(λ) = λ·μ̄ − log Σ_j w_j e^{λ·φ_j}. Returns (λ, μ̂(λ))."""
    phi, log_w = phi[log_w > -math.inf].to(log_w.dtype), log_w[log_w > -math.inf]    # samples p can hold
    mu_bar = torch.as_tensor(mu_bar, dtype=log_w.dtype, device=log_w.device).reshape(-1)
    for i, (lo, hi) in enumerate(zip(*phi.aminmax(dim=0)) if len(phi) else [(0, 0)] * len(mu_bar)):
        if lo == hi != mu_bar[i]:       # a moment moves only between the feature's extremes in the sample
            raise ValueError(f"feature {i} {'never fires' if hi == 0 else f'takes the single value {hi:g}'} in the "
                             f"{len(phi)} samples, so its moment cannot reach {mu_bar[i]:g}: draw more samples")
    dual = lambda lam: lam @ mu_bar - torch.logsumexp(log_w + phi @ lam, dim=0)     # noqa: E731
    lam = torch.zeros_like(mu_bar)
    for _ in range(max_iters):
        omega = torch.softmax(log_w + phi @ lam, dim=0)                 # (N,) SNIS weights
        grad, centred = mu_bar - omega @ phi, phi - omega @ phi
        if torch.linalg.vector_norm(grad) < tol:
            break
        step = torch.linalg.pinv(centred.T @ (omega[:, None] * centred)) @ grad     # Newton: −∇²g⁻¹·∇g
        step, g0, t = step if step @ grad > 0 else grad, dual(lam), 1.0  # flat directions: the gradient
        while dual(lam + t * step) < g0 - 64 * torch.finfo(g0.dtype).eps * (1 + g0.abs()) and t > 1e-12:
            t /= 2                      # backtrack until g does not fall, give or take rounding near the top
        lam = lam + t * step
    return lam, torch.softmax(log_w + phi @ lam, dim=0) @ phi

def batch_stats(A, log_P, logp_q, logp_pi, Z_hat, dpg):
    """A batch's advantage: mean, E|A| and Var(A) (eqs. 19-20), and for DPG its parts P/q and Ẑ·π/q (Fig. 2)."""
    return dict(mean_A=A.mean().item(), mean_abs_A=A.abs().mean().item(), var_A=A.var(unbiased=False).item(),
                mean_P_q=torch.exp(log_P - logp_q).mean().item() if dpg else None,
                mean_Zpi_q=Z_hat * torch.exp(logp_pi - logp_q).mean().item() if dpg else None)

# --- LM plumbing. ids (B, T + 1) is BOS then T tokens, and log m(x) = Σ_{t=1..T} log m(y_t | BOS, y_<t). No EOS
# stop (as GDC): all x have T tokens. No forward pass, sampling included, takes over --forward-batch-size rows.
def bos_of(tokenizer): return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

@torch.no_grad()
def sample(model, n, T, bos_id, chunk=256):
    """n exact ancestral samples of T tokens: ids (n, T + 1), log m(x) (n,) in float64. Not `generate`, whose
    top-k = 50 and EOS stop sample another distribution (every P/q wrong). Inverse-CDF draws: 2x multinomial's speed."""
    device, all_ids, all_logp = next(model.parameters()).device, [], []
    U = torch.rand(n, T, dtype=torch.float64, device=device)            # drawn first: chunks don't change x
    for start in range(0, n, chunk):
        ids = torch.full((min(chunk, n - start), 1), bos_id, dtype=torch.long, device=device)
        logp, past = torch.zeros(len(ids), dtype=torch.float64, device=device), None
        for t in range(T):
            out = model(input_ids=ids[:, -1:], attention_mask=torch.ones_like(ids), past_key_values=past)
            past, log_probs = out.past_key_values, torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (b, V)
            cdf = log_probs.double().exp().cumsum(-1)                   # a uniform against it, in float64
            u = U[start:start + len(ids), t, None] * cdf[:, -1:]
            x = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)        # (b, 1)
            logp += log_probs.gather(1, x).squeeze(1).double()
            ids = torch.cat([ids, x], dim=1)
        all_ids.append(ids), all_logp.append(logp)
    return torch.cat(all_ids), torch.cat(all_logp)

def token_logprobs(model, ids, v_head=None):
    """log m(y_t | BOS, y_<t) (B, T) of ids (B, T + 1); with PPO's value head, also V of the state before each token."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=v_head is not None)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    return logp if v_head is None else (logp, v_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1))

def sequence_logprob(model, ids, chunk=256):
    """log m(x) (B,) in float64: the sum, not the mean, of the T token log-probs, `chunk` rows at a time."""
    return torch.cat([token_logprobs(model, x).double().sum(1) for x in ids.split(chunk)])

def build_tiny(words, seed=0, n_layer=2, n_embd=64, n_head=2, max_len=64, labels=None):
    """A random GPT-2 LM (or, with `labels`, classifier) and a tokenizer of `words`, built offline from `seed`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    config = GPT2Config(vocab_size=len(vocab), n_positions=max_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, id2label=dict(enumerate(labels or [0, 1])))
    with torch.random.fork_rng(devices=[]):                 # seed the construction, not the caller's RNG
        torch.manual_seed(seed)
        model = (GPT2ForSequenceClassification if labels else GPT2LMHeadModel)(config)
    return model.eval(), PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", unk_token="<unk>",
                                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>")

def from_pretrained(auto_class, name, flag):
    """transformers' `auto_class` model and its tokenizer, by HF name, folder or PATH.gguf, or one line of BadInput."""
    transformers.utils.logging.set_verbosity_error()        # no retry chatter: one line if it fails
    folder, file = os.path.split(os.path.abspath(name)) if name.endswith(".gguf") else (name, None)   # llama.cpp's
    try:
        model = getattr(transformers, auto_class).from_pretrained(folder, gguf_file=file)   # a GGUF's weights in fp32
        if file: del model.config.quantization_config, model.hf_quantizer   # its note of them blocks save_pretrained
        return model, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except (OSError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(f"cannot load {flag} {name!r} ({why}); with no network, use {flag} tiny") from None

# --- Tasks (§4.2) and the EBM (§4.1). A feature is "word:W" (W as written: not "wikileaks" for "WikiLeaks"),
# "list:NAME" (a word of our list, lowercased; the paper's were PPLM's), "female" (more female than male pronouns,
# lowercased) or "sentiment:LABEL". Words are runs of letters and digits: "amazing," holds one, "amazingly" not.
WORDLISTS = {k: tuple(v.split()) for k, v in dict(politics="government election senate congress parliament president "
    "minister policy vote voters campaign democracy law legislation party tax reform diplomat treaty governor",
    science="science scientist research experiment physics chemistry biology laboratory theory molecule atom quantum "
    "genome telescope evolution cell energy scientists", art="art artist painting painter sculpture museum gallery "
    "canvas poetry poet novel theatre composer exhibition portrait", sports="football soccer basketball tennis "
    "baseball hockey athlete coach team championship league olympic tournament stadium", business="business company "
    "market economy investor profit revenue startup shares stock bank finance trade industry").items()}
FEMALE, MALE = ("she", "her", "hers", "herself"), ("he", "him", "his", "himself")
TASKS = {"amazing": [("word:amazing", 1.0)], "wikileaks": [("word:WikiLeaks", 1.0)],        # tasks 1-2
         "politics": [("list:politics", 1.0)], "science": [("list:science", 1.0)],           # 3-4
         "positive": [("sentiment:positive", 1.0)], "negative": [("sentiment:negative", 1.0)],   # 5-6
         "female": [("female", 0.5)], "topics": [(f"list:{t}", 0.25) for t in ("science", "art", "sports", "business")],
         "hybrid-sports": [("female", 0.5), ("list:sports", 1.0)],                           # 9
         "hybrid-politics": [("female", 0.5), ("list:politics", 1.0)]}                       # 10

def tiny_vocab(extra=(), size=1000):
    """`--model tiny`'s words: the tasks', the custom `extra` ones, then fillers ("baba", ...) up to `size`."""
    words = list(dict.fromkeys(["amazing", "WikiLeaks", *FEMALE, *MALE, *extra, *sum(WORDLISTS.values(), ())]))
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    filler = [s + t for s in syllables for t in syllables if s + t not in {w.lower() for w in words}]
    return words + filler[:max(0, size - len(words))]

def load_lm(name, extra=()):
    """The original LM a and its tokenizer: an HF causal LM, or the offline tiny one."""
    return build_tiny(tiny_vocab(extra)) if name == "tiny" else from_pretrained("AutoModelForCausalLM", name, "--model")

def load_classifier(name, device):
    """Tasks 5-6: a transformers "text-classification" pipeline with labels POSITIVE and NEGATIVE."""
    model, tokenizer = (build_tiny(tiny_vocab(), seed=1, labels=("NEGATIVE", "POSITIVE")) if name == "tiny" else
                        from_pretrained("AutoModelForSequenceClassification", name, "--classifier"))
    if not {"pos", "neg"} <= {str(v).lower()[:3] for v in model.config.id2label.values()}:
        raise BadInput(f"--classifier {name!r} has labels {list(model.config.id2label.values())}, not positive and "
                       f"negative: use a sentiment model")
    if tokenizer.pad_token is None:                         # GPT-2-like classifiers have none
        tokenizer.pad_token, model.config.pad_token_id = tokenizer.eos_token, tokenizer.eos_token_id
    return transformers.pipeline("text-classification", model=model.eval(), tokenizer=tokenizer, device=device)

def feature(name, text, wordlists=WORDLISTS):
    """φ(x) ∈ {0, 1} of a decoded text for the feature `name` (see the section's comment)."""
    (kind, _, arg), words = name.partition(":"), re.findall(r"\w+", text)
    lower = [w.lower() for w in words]
    rule = dict(word=lambda: arg in words, list=lambda: not set(wordlists[arg]).isdisjoint(lower),
                female=lambda: sum(w in FEMALE for w in lower) > sum(w in MALE for w in lower)).get(kind)
    if rule is None:
        raise ValueError(f"unknown feature {name!r}: use word:W, list:NAME or female")
    return float(rule())

def phi_matrix(features, texts, wordlists=WORDLISTS, classify=None):
    """φ of N texts for k features, (N, k) float; the sentiment features ask the `classify` pipeline."""
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
                lines = [(i + 1, w.strip()) for i, w in enumerate(f) if w.strip() and not w.startswith("#")]
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read --wordlist {cfg.wordlist!r} ({type(e).__name__}): give a UTF-8 text file")
        if (bad := [i for i, w in lines if not re.fullmatch(r"\w+", w)]) or not lines:
            raise BadInput(f"--wordlist {cfg.wordlist!r} must hold one word (letters and digits) per line: "
                           + (f"line {bad[0]} is not one" if bad else "found no words"))
        wordlists[cfg.wordlist], task = tuple(w.lower() for _, w in lines), task + [(f"list:{cfg.wordlist}", 1.0)]
    if not task and cfg.task not in TASKS:
        raise BadInput(f"unknown task {cfg.task!r}: choose one of {', '.join(TASKS)}, or give --word or --wordlist")
    features, mu_bar = map(list, zip(*(task or TASKS[cfg.task])))
    try:
        mu_bar = [float(m) for m in cfg.moments.split(",")] if cfg.moments else mu_bar
    except ValueError:
        raise BadInput(f"--moments {cfg.moments!r}: give numbers separated by commas, e.g. 0.5,1") from None
    if len(mu_bar) != len(features):
        raise BadInput(f"--moments has {len(mu_bar)} values but the task has {len(features)} features "
                       f"({', '.join(features)}): give one per feature")
    if not all(0 <= m <= 1 for m in mu_bar):
        raise BadInput(f"target moments {mu_bar} must lie in [0, 1]: each is the probability of a binary feature")
    return features, mu_bar, wordlists

def log_P_of(logp_a, phi, mu_bar, lam):
    """log P(x) = log a(x) + λ·φ_soft(x) where φ_i(x) = μ̄_i for every hard feature i, else −inf   (eq. 16).
    A feature with μ̄ ∈ {0, 1} is pointwise (§4.1): exp(λφ) would need λ = ±∞, so it is an exact factor of P,
    and λ weighs the others alone (GDC fits a finite λ to a hybrid task's μ̄ = 1 feature: README, "Deviations" 1)."""
    mu_bar = torch.as_tensor(mu_bar, dtype=phi.dtype, device=phi.device)
    hard = (mu_bar == 0) | (mu_bar == 1)
    log_P = logp_a + phi[:, ~hard].to(logp_a.dtype) @ lam.to(logp_a)
    return torch.where((phi[:, hard] == mu_bar[hard]).all(1), log_P, -math.inf)

# --- Evaluation (§4.2), on exact samples of π (GDC evaluated q, with top-p 0.9, on pointwise tasks)
tokens_of = re.compile(r"\w+|[^\w\s]+").findall   # words and punctuation, as nltk's wordpunct_tokenize (no data needed)

def distinct_n(texts, n):
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams, over all texts together; 1 if none repeats."""
    grams = [tuple(t[i:i + n]) for t in map(tokens_of, texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan

def self_bleu(texts, ns=(3, 4, 5)):
    """Self-BLEU-n (Zhu et al. 2018): each text's BLEU-n against all others (word tokens, smoothed), averaged."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    tokens = [tokens_of(t) for t in texts]
    scores = [sentence_bleu(tokens[:i] + tokens[i + 1:], hyp, [(1 / n,) * n for n in ns], smoothing_function=
              SmoothingFunction().method1) for i, hyp in enumerate(tokens) if len(tokens) > 1]   # one text: none
    scores = [s if isinstance(s, list) else [s] * len(ns) for s in scores]   # nltk: a bare 0 if nothing matches
    return [sum(column) / len(scores) for column in zip(*scores)] if len(tokens) > 1 else [math.nan] * len(ns)

@torch.no_grad()
def evaluate(pi, score, n, T, bos, f, tokenizer, n_diverse, Z):
    """(texts, metrics) on n samples of π; D_KL(p‖π) on them is blind to what π has lost (the q-check's is not)."""
    ids, logp_pi = sample(pi, n, T, bos, f)
    logp_a, phi, log_P = score(ids)
    texts = tokenizer.batch_decode(ids[:, 1:].tolist())
    return texts, dict(E_pi_phi=phi.mean(0).tolist(), kl_pi_a=kl_reverse(logp_pi, logp_a).item(),
                       kl_p_pi_on_pi=kl_p_m(log_P, logp_pi, logp_pi, Z).item(),
                       tvd_p_pi_on_pi=tvd_p_m(log_P, logp_pi, logp_pi, Z).item(),
                       **{f"distinct_{k}": distinct_n(texts[:n_diverse], k) for k in (1, 2, 3)},
                       **dict(zip(("self_bleu_3", "self_bleu_4", "self_bleu_5"), self_bleu(texts[:n_diverse]))))

# --- Training: Algorithm 1, and in the same loop the comparison methods of §4.3, which sample π instead of q and
# differ from DPG in their update alone
def method_name(cfg):     # the paper's names (§4.3)
    return dict(dpg=("GDC", "GDC++"), reinforce=("Reinforce", "Reinforce-baseline"), ziegler=("Ziegler",) * 2)[
        cfg.method][cfg.baseline]

def method_loss(cfg, logp_pi, logp_q, log_P, Z_hat, j):
    """(loss, A) of the samples j of a batch: the one place where DPG and Reinforce differ. Reinforce's reward
    is φ(x) = [P(x) > 0], and its baseline the batch's mean reward (eq. 12)."""
    if cfg.method == "reinforce":
        R = (log_P > -math.inf).to(logp_pi.dtype)
        return reinforce_loss(logp_pi, (R - R.mean() if cfg.baseline else R)[j])
    return dpg_loss(logp_pi, logp_q[j], log_P[j], Z_hat, cfg.baseline)

def grad_norm(opt): return torch.nn.utils.get_total_norm([p.grad for g in opt.param_groups for p in g["params"]
                                                         if p.grad is not None])

def check_finite(step, quantities):
    """Stop before an update carries a NaN or ±inf (say, a P/q beyond e^709) into π, where Adam would keep it."""
    for name, x in quantities.items():
        if not torch.isfinite(x := torch.as_tensor(x)).all():
            raise NotFinite(f"step {step}: {name} is {'NaN' if x.isnan().any() else 'infinite'}, so π was not "
                            f"updated with it; lower --lr or check the task")

def ppo_update(pi, v_head, a, ids, log_P, s, cfg, opt, sched, step):
    """Ziegler on a batch ids ~ π: fixed GAE advantages A of the penalised rewards, then PPO steps; returns A."""
    with torch.no_grad():
        chunks = ids.split(cfg.forward_batch_size)
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
            check_finite(step, {"PPO gradient": grad_norm(opt)}), opt.step(), sched.step()
    s["beta"] = adaptive_beta(s["beta"], (logp_old - logp_a).sum(1).mean().item(), cfg.kl_target, cfg.kl_horizon,
                              len(ids))
    return A

def n_steps_of(cfg, mu_bar):         # --steps, or --samples / B (GDC++: 6.4M samples pointwise, else 8.4M)
    return cfg.steps or -(-(cfg.samples or (6_400_000 if set(mu_bar) <= {0, 1} else 8_400_000)) // cfg.batch_size)

def fmt(values): return "/".join(f"{round(v, 6) + 0.0:.3g}" for v in (values if isinstance(values, list) else [values]))

# metrics.jsonl key → its label in a step's line and in figures/plot.py (Figs. 3, 5 and 2); README "Metrics" says more
LABELS = dict(E_pi_phi="E_π φ", kl_p_pi="KL(p‖π)", kl_pi_a="KL(π‖a)", tvd_p_pi="TVD(p,π)", self_bleu_5="Self-BLEU-5",
              distinct_1="Distinct-1", Z_hat="Ẑ", mean_abs_A="mean|A|", var_A="Var(A)", var_G="Var(G)",
              q_updates="q updates", beta="β", mean_P_q="P/q", mean_Zpi_q="Ẑ·π/q", mean_A="mean A")

def log_metrics(cfg, s, texts, m, n_steps, path, log):
    """Print a step's line and three samples of π; append the step's metrics to OUT/metrics.jsonl."""
    m = dict(step=s["step"], samples=s["step"] * cfg.batch_size, **m, kl_p_pi=s["kl_p_pi"], tvd_p_pi=s["tvd_p_pi"],
             kl_p_q=s["kl_p_q"], Z_hat=s["Z_hat"], **s["batch"], var_G=s["var_G"], ess_P_q=s["ess_q"],
             q_updated=s["q_updated"], q_updates=s["q_updates"], beta=s["beta"], seconds=round(s["seconds"], 1))
    shown = [*LABELS][:9] + ["var_G"] * bool(cfg.grad_var_interval) + [dict(dpg="q_updates", ziegler="beta").get(
        cfg.method)]
    log(f"step {s['step']:>{len(str(n_steps))}}/{n_steps}  " + "  ".join(f"{LABELS[k]} {fmt(m[k])}" for k in shown if k)
        + f"  {m['seconds']:.0f}s" + "".join(f"\n    {text[:120]!r}" for text in texts[:3]))
    s["q_updated"], m = False, {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}
    with open(path, "a") as file:                                       # JSON has no NaN or inf: null
        file.write(json.dumps(m) + "\n")
    return m

def train(cfg, task, a, tokenizer, ckpt=None, log=print):
    """Fine-tune π from a toward p, writing OUT/config.json, metrics.jsonl, checkpoint.pt and π; return π, metrics."""
    (features, mu_bar, wordlists), device = task, cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    B, f, T, K = cfg.batch_size, cfg.forward_batch_size, cfg.seq_len, cfg.q_update_interval
    n_steps, bos = n_steps_of(cfg, mu_bar), bos_of(tokenizer)
    classify = load_classifier(cfg.classifier, device) if any(x.startswith("sentiment:") for x in features) else None
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    # a is frozen; the proposal q and the policy π_θ start as a. All stay in eval mode, without dropout: the π we
    # differentiate must be the π that scored x (GDC never called .train() either).
    a = a.to(device).eval().requires_grad_(False)
    q, pi = copy.deepcopy(a), copy.deepcopy(a).requires_grad_(True)
    proposal = q if cfg.method == "dpg" else pi                         # Reinforce and Ziegler: on-policy
    v_head = torch.nn.Linear(pi.config.hidden_size, 1).to(device) if cfg.method == "ziegler" else None  # PPO's
    opt = torch.optim.Adam(list(pi.parameters()) + (list(v_head.parameters()) if v_head else []), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, cfg.warmup)))

    def score(ids, lam):
        """log a(x), φ(x) and log P(x) of samples ids (N, T + 1)."""
        logp_a = sequence_logprob(a, ids, f)                            # a is frozen: no graph is built
        phi = phi_matrix(features, tokenizer.batch_decode(ids[:, 1:].tolist()), wordlists, classify).to(device)
        return logp_a, phi, log_P_of(logp_a, phi, mu_bar, lam)
    soft, nan = [m for m in mu_bar if m not in (0, 1)], math.nan
    s = dict(step=-1, seconds=0.0, lam=torch.zeros(len(soft), dtype=torch.float64, device=device), Z_hat=0.0, rounds=0,
             q_updates=0, q_updated=False, beta=cfg.kl_beta if v_head else None, m=None, **dict.fromkeys(("var_G",
             "kl_p_pi", "kl_p_q", "tvd_p_pi", "ess_q"), nan), batch=batch_stats(torch.full((2,), nan), *[None] * 4, 0))
    if soft and ckpt is None:        # λ by SNIS on samples of a = q, inside the hard constraints (weight 0 outside)
        _, phi, log_P = score(sample(a, cfg.lambda_samples, T, bos, f)[0], s["lam"])
        try:
            s["lam"], mu_hat = fit_lambdas(phi[:, [m in soft for m in mu_bar]],
                                           torch.where(log_P > -math.inf, 0.0, -math.inf), soft, cfg.lambda_tol)
        except ValueError as e:
            raise BadInput(f"fitting λ on {cfg.lambda_samples} samples of a: {e}") from None
        log(f"λ = {fmt(s['lam'].tolist())} gives E_p φ ≈ {fmt(mu_hat.tolist())} on samples of a, for μ̄ = {fmt(soft)}")
        if torch.linalg.vector_norm(mu_hat - torch.tensor(soft, device=device).double()) >= cfg.lambda_tol:
            log(f"warning: λ did not reach the targets within --lambda-tol {cfg.lambda_tol}; training goes on")
    shutil.rmtree(cfg.out) if cfg.overwrite and os.path.isdir(cfg.out) else None   # only now: bad input wrote nothing
    pi.config.dpg_min = asdict(cfg)                                     # the run's flags, in OUT/config.json
    pi.config.save_pretrained(cfg.out)
    metrics, tmp = os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "checkpoint.pt.tmp")
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
    log(f"{method_name(cfg)} on {', '.join(features)} (μ̄ = {fmt(mu_bar)}), {cfg.model}, {n_steps} steps of B = {B} "
        f"samples of T = {T} tokens, on {device}")
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
                # line 5: the batch-mean gradient, accumulated over chunks of f samples, each weighted by its share
                # of B, so that any f gives the same step (GDC summed the chunks' means)
                opt.zero_grad()
                A, logp_pi = [], []
                for i in range(0, B, f):
                    logp_pi.append(sequence_logprob(pi, ids[i:i + f], f))
                    loss, A_i = method_loss(cfg, logp_pi[-1], logp_q, log_P, s["Z_hat"], slice(i, i + f))
                    (loss * len(A_i) / B).backward(), A.append(A_i)
                A, logp_pi = torch.cat(A), torch.cat(logp_pi).detach()
                check_finite(step, {"advantage A": A, "gradient norm": grad_norm(opt)})
                opt.step(), sched.step()                                # line 6: θ ← θ + α·∇
            s["batch"] = batch_stats(A, log_P, logp_q, logp_pi, s["Z_hat"], proposal is q)
        if step % K == 0 or step == n_steps:
            # lines 7-10, on K·B fresh samples of q (the batch would judge π on what it was just fitted to). Ẑ is
            # the equal-weight mean of every round's estimate, each unbiased (eq. 13), as GDC's.
            ids, logp_q = sample(q, K * B, T, bos, f)
            _, _, log_P = score(ids, s["lam"])
            check_finite(step, {"Ẑ of this round": (Z_round := estimate_Z(log_P, logp_q).item())})
            s["Z_hat"], s["rounds"] = (Z_round + s["rounds"] * s["Z_hat"]) / (s["rounds"] + 1), s["rounds"] + 1
            with torch.no_grad():                                   # KL̂(p‖π), KL̂(p‖q), TVD̂(p, π) and ESS/N
                logp_pi, Z = sequence_logprob(pi, ids, f), s["Z_hat"]
            s.update(kl_p_pi=kl_p_m(log_P, logp_q, logp_pi, Z).item(), kl_p_q=kl_p_m(log_P, logp_q, logp_q, Z).item(),
                     tvd_p_pi=tvd_p_m(log_P, logp_q, logp_pi, Z).item(), ess_q=ess(log_P - logp_q) / len(ids))
            if Z_round == 0:
                log(f"step {step}: no sample of q has P(x) > 0 among {K * B}, so this round adds 0 to Ẑ")
            if proposal is q and step > 0 and s["kl_p_pi"] < s["kl_p_q"]:      # never while Ẑ = 0: both inf
                q.load_state_dict(pi.state_dict())                      # q ← π
                s["q_updates"], s["q_updated"] = s["q_updates"] + 1, True
        s["step"], s["seconds"] = step, time.time() - t0
        if step % cfg.eval_interval == 0 or step == n_steps:
            s["m"] = log_metrics(cfg, s, *evaluate(pi, lambda x: score(x, s["lam"]), cfg.eval_samples, T, bos, f,
                                                   tokenizer, cfg.diversity_samples, s["Z_hat"]), n_steps, metrics, log)
        if step % cfg.save_interval == 0 or step == n_steps:
            # one file, whole or not at all: written under a temporary name, then renamed (atomic)
            torch.save(dict(pi=pi.state_dict(), q=q.state_dict(), s=s, v_head=v_head and v_head.state_dict(),
                            opt=opt.state_dict(), sched=sched.state_dict(), metrics_bytes=os.path.getsize(metrics),
                            rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                                     cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])), tmp)
            os.replace(tmp, tmp[:-4])
    transformers.utils.logging.disable_progress_bar()                   # no bar for one small write
    pi.save_pretrained(cfg.out), tokenizer.save_pretrained(cfg.out)
    log(f"saved π to {cfg.out}: load it with AutoModelForCausalLM.from_pretrained({cfg.out!r})")
    return pi, s["m"]

def read_checkpoint(out):
    """OUT/checkpoint.pt (memory-mapped, read when used), or one line of BadInput if it is missing or damaged."""
    if not os.path.exists(path := os.path.join(out, "checkpoint.pt")):
        raise BadInput(f"--resume {out!r}: the run has no checkpoint yet; start it again with --overwrite")
    try:                                                # weights_only=False: it holds RNG states, and we wrote it
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise BadInput(f"--resume {out!r}: checkpoint.pt is damaged ({type(e).__name__}); start again with --overwrite")

# --- Command line: `python dpg_min.py [flags]` (figures/plot.py draws the paper's figures from the runs' logs)
RESUMABLE = ("steps", "samples", "lr", "device", "save_interval", "resume")     # change neither past nor task

def refuse(message): raise BadInput(message)

def saved_flags(out):                   # the flags of the run in folder OUT (OUT/config.json), or None if none
    try:
        with open(os.path.join(out, "config.json")) as f:
            return {k: v for k, v in json.load(f)["dpg_min"].items() if k in {x.name for x in fields(Config)}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None

def parse_config(argv):
    """Config from the flags (`--model tiny` fills the unset ones from TINY); the output folder checked."""
    parser = argparse.ArgumentParser(prog="dpg_min.py", description=__doc__.split("\n\n")[0], epilog="GDC++: "
                                     f"the default is that of {GDC}configs/gdc++/*.json (the paper's own runs)")
    parser.error = refuse                                               # one line, not the usage text
    for x in fields(Config):
        default = (f" [default: {x.default}" + (f", tiny: {TINY[x.name]}]" if x.name in TINY else "]")) * (
            x.default not in ("", None, False))
        kind = dict(action="store_true") if x.type is bool else dict(type=x.type, metavar=x.name.upper())
        parser.add_argument("--" + x.name.replace("_", "-"), default=None, help=x.metadata["help"] + default, **kind)
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
    if os.path.exists(cfg.out) and (not os.path.isdir(cfg.out) or os.listdir(cfg.out)) and not cfg.overwrite:
        refuse(f"--out {cfg.out!r} already exists and is not an empty directory; choose a new one, or add --resume "
               f"{cfg.out} to continue its run, or --overwrite to replace it")
    if cfg.overwrite and os.path.exists(cfg.out) and saved_flags(cfg.out) is None:
        refuse(f"--overwrite: {cfg.out!r} holds no dpg_min run (no config.json), so it is left alone; choose another")
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
        refuse(f"--method {cfg.method} needs a pointwise task (every moment 0 or 1): a reward cannot express the "
               f"distributional constraint μ̄ = {mu_bar} (paper §4); use --method dpg")

def main(argv=None):
    argv, cfg = sys.argv[1:] if argv is None else argv, None
    try:
        cfg = parse_config(argv)
        check_config(cfg, (task := load_task(cfg))[1])                  # the task is read once, here
        if (ckpt := read_checkpoint(cfg.out) if cfg.resume else None) and ckpt["s"]["step"] >= n_steps_of(cfg, task[1]):
            refuse(f"--resume {cfg.out!r}: the run has finished its {ckpt['s']['step']} steps; give --steps above "
                   f"{ckpt['s']['step']} to train it further")
        a, tokenizer = load_lm(cfg.model, [x[5:] for x in task[0] if x[:5] == "word:"] + [*sum(task[2].values(), ())])
        if cfg.seq_len + 1 > (n := getattr(a.config, "max_position_embeddings", math.inf)):
            refuse(f"--seq-len {cfg.seq_len} is too long for {cfg.model} ({n} positions)")
        train(cfg, task, a, tokenizer, ckpt, log=lambda line: (tqdm.write(line), sys.stdout.flush()))
    except BadInput as e:
        print(f"dpg_min.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NotFinite as e:
        if os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
            e = f"{e}. Its last good checkpoint is {cfg.out}/checkpoint.pt: go on with --resume {cfg.out}"
        print(f"dpg_min.py: stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:                             # `... | head` stopped reading: the run is not finished
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)

if __name__ == "__main__":
    main()
