"""Fig. 4 on exact metrics (issue 30): does GDC++'s baseline make small batches work? GDC and GDC++
train with sampled batches, x ~ q, on toy_exact.py's space (V = 3, T = 3 and an end symbol: 40
sequences; the table policy; a tilted against the symbol 0; φ(x) = [x contains 0]), with
dpg_min.py's dpg_loss and torch's Adam, many seeds at once (one row of θ each: Adam is elementwise,
so the rows train independently). Every step, E_π φ, D_KL(p‖π) and TVD(p, π) are exact sums over X,
so the only noise left is the training's own. Algorithm 1's q ← π every K steps compares the exact
D_KL(p‖·), and GDC++'s baseline uses the exact Z (not Ẑ): the question is the baseline's, not Ẑ's
noise.

    python figures/fig4_exact.py                    # both targets, the batch sizes, 100 seeds each
"""
import argparse
import math
import os
import sys
from types import SimpleNamespace

import torch
from torch.func import vmap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dpg_min as dm  # noqa: E402
import toy_exact as tx  # noqa: E402


def train_seeds(baseline, B, seeds, samples, lr, K=10, mu=None):
    """Exact E_π φ, D_KL(p‖π), TVD(p, π) after each step, (steps + 1, seeds) each, and the last
    log π (seeds, |X|), for one method (baseline: GDC++) at batch size B, until `samples` training
    samples; seed s draws from torch.Generator seeded s. mu: None for the pointwise target
    (P = a·φ), else E_p φ = mu."""
    X, logp, theta_a, logp_a, phi, log_P = tx.toy_target(mu=mu)
    Z = torch.exp(torch.logsumexp(log_P, 0))
    log_p = log_P - torch.log(Z)
    logp_all = vmap(logp, in_dims=(0, None))                    # θ (S, n) → log π (S, N)
    theta = theta_a.flatten().repeat(seeds, 1).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    logp_q = logp_a.repeat(seeds, 1)
    n_steps = samples // B
    # seed s's uniforms, drawn first: its batches do not depend on how many seeds run beside it
    U = torch.stack([torch.rand(n_steps, B, generator=torch.Generator().manual_seed(s),
                                dtype=tx.DT) for s in range(seeds)])
    kl_p = vmap(tx.kl, in_dims=(None, 0))
    rows = []
    for step in range(n_steps + 1):
        lp = logp_all(theta, X.steps)
        pi = lp.detach().exp()
        rows.append(((pi @ phi)[:, 0], kl_p(log_p, lp.detach()),
                     0.5 * (pi - log_p.exp()).abs().sum(1)))
        if step > 0 and step % K == 0:                          # Algorithm 1, lines 7-10
            closer = kl_p(log_p, lp.detach()) < kl_p(log_p, logp_q)
            logp_q = torch.where(closer[:, None], lp.detach(), logp_q)
        if step == n_steps:
            break
        cdf = logp_q.exp().cumsum(1)                            # x ~ q by inverse CDF, as sample
        x = torch.searchsorted(cdf, U[:, step] * cdf[:, -1:]).clamp(max=X.N - 1)   # (S, B)
        loss, _ = dm.dpg_loss(lp.gather(1, x).flatten(), logp_q.gather(1, x).flatten(),
                              log_P[x].flatten(), Z, baseline)
        opt.zero_grad()
        (loss * seeds).backward()                               # each row: its own batch mean
        opt.step()
    return [torch.stack(column) for column in zip(*rows)] + [lp.detach()]


def reached(metric, B, below=False, threshold=0.5):
    """Training samples until each seed's metric first reaches threshold (inf if never), (S,)."""
    hit = metric <= threshold if below else metric >= threshold
    first = torch.where(hit.any(0), hit.to(torch.int8).argmax(0).double(), math.inf)
    return first * B


def interval(values):
    """The median, 5th and 95th percentiles of values by nearest rank (inf stays inf: never)."""
    ranked = values.double().sort().values
    return [ranked[round(f * (len(ranked) - 1))].item() for f in (0.5, 0.05, 0.95)]


def mechanism(mu=None):
    """At the start, π = q = a, exactly (toy_exact.variance_terms): ‖E_q G‖² (the same for both,
    as both are unbiased), the single-sample Var(G) of GDC (b = 0) and of GDC++ (b = Z), b*, Z."""
    X, logp, theta_a, logp_a, _, log_P = tx.toy_target(mu=mu)
    Z = torch.exp(torch.logsumexp(log_P, 0))
    inst = SimpleNamespace(X=X, logp=logp, log_P=log_P, Z=Z)
    theta = theta_a.flatten()
    var, _, _, b_star = tx.variance_terms(inst, theta, logp_a)
    mean = logp_a.exp() @ tx.dpg_grads(inst, theta, logp_a, Z, baseline=True)
    return dict(mean2=float(mean @ mean), var_gdc=float(var(torch.zeros((), dtype=tx.DT))),
                var_gdcpp=float(var(Z)), b_star=float(b_star), Z=float(Z))


def best_lr(baseline, B, seeds, samples, grid, mu):
    """The rate of `grid` with the lowest median exact D_KL(p‖π) after `samples` at batch size B."""
    finals = [interval(train_seeds(baseline, B, seeds, samples, lr, mu=mu)[1][-1])[0]
              for lr in grid]
    return grid[finals.index(min(finals))]


def table(argv=None):
    parser = argparse.ArgumentParser(prog="figures/fig4_exact.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--samples", type=int, default=8192, help="training samples per run")
    parser.add_argument("--batch-sizes", default="2,8,32,128,512")
    parser.add_argument("--lr", type=float, help="Adam's rate for every run (default: for each "
                        "method and target, the best of --lr-grid at the largest batch size)")
    parser.add_argument("--lr-grid", default="0.01,0.03,0.1,0.3,1")
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    for mu, name, below, threshold in ((None, "pointwise, E_π φ ≥ 0.5", False, 0.5),
                                       (0.5, "E_p φ = 0.5, TVD(p,π) ≤ 0.1", True, 0.1)):
        print(f"{name}: samples to reach it, median [5%, 95%] of {args.seeds} seeds; never "
              f"reached; D_KL(p‖π) after {args.samples} samples, median [5%, 95%]")
        grid = [float(lr) for lr in args.lr_grid.split(",")]
        rates = {}
        for baseline in (False, True):
            rates[baseline] = args.lr or best_lr(baseline, max(sizes), args.seeds, args.samples,
                                                 grid, mu)
        print(f"  Adam's rate: GDC {rates[False]:g}, GDC++ {rates[True]:g}")
        m = mechanism(mu)
        print(f"  at π = q = a: ‖E G‖² {m['mean2']:.3g}; single-sample Var(G): GDC "
              f"{m['var_gdc']:.3g}, GDC++ {m['var_gdcpp']:.3g} (Z = {m['Z']:.3g}, b* = "
              f"{m['b_star']:.3g}); E_q A: GDC Z, GDC++ 0")
        for B in sizes:
            for baseline in (False, True):
                E, kl, tv, _ = train_seeds(baseline, B, args.seeds, args.samples, rates[baseline],
                                           mu=mu)
                metric = tv if below else E
                when = reached(metric, B, below, threshold)
                never = (when == math.inf).double().mean().item()
                m, lo, hi = interval(when)
                k, klo, khi = interval(kl[-1])
                print(f"  B = {B:4}  {'GDC++' if baseline else 'GDC  '}  {m:8.0f} [{lo:.0f}, "
                      f"{hi:.0f}]  never {never:4.0%}  D_KL {k:.3f} [{klo:.3f}, {khi:.3f}]")


if __name__ == "__main__":
    table()
