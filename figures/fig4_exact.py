"""Fig. 4 on exact metrics: does GDC++'s baseline make small batches work? GDC and GDC++
train with sampled batches, x ~ q, on toy_exact.py's space (V = 3, T = 3 and an end symbol: 40
sequences; the table policy; a tilted against the symbol 0; φ(x) = [x contains 0]), with
dpg_min.py's dpg_loss and torch's Adam (or SGD), many seeds at once (one row of θ each: both are
elementwise, so the rows train independently). Every step, E_π φ, D_KL(p‖π) and TVD(p, π) are exact
sums over X, so the only noise left is the training's own; at a few steps, so is the single-sample
Var(G) of both estimators (§4.5). Algorithm 1's q ← π every K steps compares the exact D_KL(p‖·),
and GDC++'s baseline uses the exact Z (not Ẑ): the question is the baseline's, not Ẑ's noise.

    python figures/fig4_exact.py --out figures/fig4_exact.png --overwrite    # 100 seeds a cell
    python figures/fig4_exact.py --sgd --lr-grid 0.3,1,3,10,30,100,300,1000     # the control
"""
import argparse
import importlib.util
import math
import os
import sys

import torch
from torch.func import jacrev, vmap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))          # cli.py, here
import cli  # noqa: E402
import dpg_min as dm  # noqa: E402
import toy_exact as tx  # noqa: E402


def logp_all(logp):
    """θ (S, n) → log π (S, |X|): the table policy of toy_exact, one row of θ per seed."""
    return vmap(logp, in_dims=(0, None))


def exact_moments(theta, lp, logp, X, logp_q, log_P, Z):
    """For each row of θ (S, n), at log π = lp and q, from one Jacobian ∇log π_θ(x) over X: the
    exact single-sample Var(G) = E_q‖G‖² − ‖E_q G‖² of G = A(x)·∇log π_θ(x), x ~ q, with dpg_min's
    A of GDC, then of GDC++, and ‖E_q G‖², the same for both (unbiased, Fact 2): three (S,)."""
    g = vmap(jacrev(logp), in_dims=(0, None))(theta.detach(), X.steps)     # (S, |X|, n)
    q = logp_q.exp()
    var = []
    for baseline in (False, True):
        A = dm.dpg_advantage(lp, logp_q, log_P.expand_as(lp), Z, baseline)
        G = A[..., None] * g
        mean = (q[..., None] * G).sum(1)
        var.append((q * G.pow(2).sum(-1)).sum(1) - mean.pow(2).sum(1))
    return var[0], var[1], mean.pow(2).sum(1)


def train_seeds(baseline, B, seeds, samples, lr, K=10, mu=None, sgd=False, probe=()):
    """One method (baseline: GDC++) at batch size B until `samples` training samples, seed s
    drawing from torch.Generator seeded s. mu: None for the pointwise target (P = a·φ), else
    E_p φ = mu. sgd: plain SGD instead of Adam. Returns a dict of (steps + 1, seeds) tensors: the
    exact E_π φ, D_KL(p‖π), TVD(p, π) after each step; A_mean, each batch's mean advantage
    (steps, seeds); at the steps in probe, the exact single-sample Var(G) of GDC (var_gdc) and
    GDC++ (var_gdcpp) and ‖E_q G‖² (mean2) at that step's π and q; log_pi and theta, the last."""
    X, logp, theta_a, logp_a, phi, log_P = tx.toy_target(mu=mu)
    Z = torch.exp(torch.logsumexp(log_P, 0))
    log_p = log_P - torch.log(Z)
    theta = theta_a.flatten().repeat(seeds, 1).requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=lr) if sgd else torch.optim.Adam([theta], lr=lr)
    logp_q = logp_a.repeat(seeds, 1)
    n_steps = samples // B
    # seed s's uniforms, drawn first: its batches do not depend on how many seeds run beside it
    U = torch.stack([torch.rand(n_steps, B, generator=torch.Generator().manual_seed(s),
                                dtype=tx.DT) for s in range(seeds)])
    kl_p = vmap(tx.kl, in_dims=(None, 0))
    out = {name: [] for name in ("E", "kl", "tvd", "A_mean", "var_gdc", "var_gdcpp", "mean2")}
    for step in range(n_steps + 1):
        lp = logp_all(logp)(theta, X.steps)
        pi = lp.detach().exp()
        out["E"].append((pi @ phi)[:, 0])
        out["kl"].append(kl_p(log_p, lp.detach()))
        out["tvd"].append(0.5 * (pi - log_p.exp()).abs().sum(1))
        if step > 0 and step % K == 0:                          # Algorithm 1, lines 7-10
            closer = kl_p(log_p, lp.detach()) < kl_p(log_p, logp_q)
            logp_q = torch.where(closer[:, None], lp.detach(), logp_q)
        if step in probe:
            moments = exact_moments(theta, lp.detach(), logp, X, logp_q, log_P, Z)
            for name, value in zip(("var_gdc", "var_gdcpp", "mean2"), moments):
                out[name].append(value)
        if step == n_steps:
            break
        cdf = logp_q.exp().cumsum(1)                            # x ~ q by inverse CDF, as sample
        x = torch.searchsorted(cdf, U[:, step] * cdf[:, -1:]).clamp(max=X.N - 1)   # (S, B)
        loss, A = dm.dpg_loss(lp.gather(1, x).flatten(), logp_q.gather(1, x).flatten(),
                              log_P[x].flatten(), Z, baseline)
        out["A_mean"].append(A.view(seeds, B).mean(1))
        opt.zero_grad()
        (loss * seeds).backward()                               # each row: its own batch mean
        opt.step()
    result = {name: torch.stack(rows) for name, rows in out.items() if rows}
    result["log_pi"] = lp.detach()
    result["theta"] = theta.detach()
    return result


def reached(metric, B, below=False, threshold=0.5):
    """Training samples until each seed's metric first reaches threshold (inf if never), (S,)."""
    hit = metric <= threshold if below else metric >= threshold
    first = torch.where(hit.any(0), hit.to(torch.int8).argmax(0).double(), math.inf)
    return first * B


def interval(values):
    """The median, 5th and 95th percentiles of values by nearest rank (inf stays inf: never)."""
    ranked = values.double().sort().values
    return [ranked[round(f * (len(ranked) - 1))].item() for f in (0.5, 0.05, 0.95)]


def best_run(baseline, B, rates, args, mu, probe):
    """Of one run at each of `rates`, the one with the lowest median exact D_KL(p‖π) after the
    budget: (its rate, the run)."""
    runs = [train_seeds(baseline, B, args.seeds, args.samples, lr, mu=mu, sgd=args.sgd, probe=probe)
            for lr in rates]
    finals = [interval(run["kl"][-1])[0] for run in runs]
    best = finals.index(min(finals))
    return rates[best], runs[best]


def probe_steps(samples, B):
    """The steps where the mechanism is measured: the start, 1/64, 1/16, 1/4 and all the budget."""
    steps = samples // B
    return sorted({0, steps // 64, steps // 16, steps // 4, steps})


def ints(text):
    return [int(b) for b in text.split(",")]


def floats(text):
    return [float(x) for x in text.split(",")]


SIZES = dm.checked(ints, lambda v: min(v) > 0, "positive integers, e.g. 2,8,32")
RATES = dm.checked(floats, lambda v: 0 < min(v) and max(v) < math.inf, "positive rates, e.g. 0.1,1")


def table(argv=None):
    parser = argparse.ArgumentParser(prog="figures/fig4_exact.py",
                                     description=__doc__.split("\n\n")[0])
    parser.error = dm.refuse
    parser.add_argument("--seeds", type=dm.POSITIVE, default=100, help="seeds a cell [100]")
    parser.add_argument("--samples", type=dm.POSITIVE, default=16384,
                        help="training samples per run [16384]")
    parser.add_argument("--batch-sizes", type=SIZES, default="2,8,32,128,512",
                        help="[2,8,32,128,512]")
    parser.add_argument("--lr", type=dm.FINITE, help="the rate for every run (default: for each "
                        "method and target, the best of --lr-grid at the largest batch size, "
                        "then held, or with --sgd scaled by B / the largest B)")
    parser.add_argument("--lr-grid", type=RATES, default="0.01,0.03,0.1,0.3,1",
                        help="[0.01,0.03,0.1,0.3,1]")
    parser.add_argument("--lr-per-batch", action="store_true", help="the best of --lr-grid at "
                        "each batch size, for each method and target")
    parser.add_argument("--sgd", action="store_true", help="plain SGD instead of Adam")
    parser.add_argument("--out", help="draw Fig. 4 to this PNG file")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    sizes = args.batch_sizes
    grid = args.lr_grid
    if args.samples < max(sizes):
        dm.refuse(f"--samples {args.samples} is less than one batch of {max(sizes)}: give at "
                  f"least the largest of --batch-sizes")
    if args.out and os.path.exists(args.out) and not args.overwrite:
        dm.refuse(f"--out {args.out!r} already exists; choose a new file, or add --overwrite")
    if args.out and importlib.util.find_spec("matplotlib") is None:
        dm.refuse("--out needs matplotlib, which is optional: pip install matplotlib")
    panels = []
    for mu, name, below, threshold in ((None, "pointwise, E_π φ ≥ 0.5", False, 0.5),
                                       (0.5, "E_p φ = 0.5, TVD(p,π) ≤ 0.1", True, 0.1)):
        print(f"{name}: samples to reach it, median [5%, 95%] of {args.seeds} seeds; never "
              f"reached; D_KL(p‖π) after {args.samples} samples, median [5%, 95%]")
        largest = max(sizes)
        chosen = {}
        for baseline in (False, True):
            if not (args.lr or args.lr_per_batch):
                chosen[baseline] = best_run(baseline, largest, grid, args, mu,
                                            probe_steps(args.samples, largest))
        runs = {}
        for B in sizes:
            probe = probe_steps(args.samples, B)
            for baseline in (False, True):
                if args.lr:
                    lr, run = best_run(baseline, B, [args.lr], args, mu, probe)
                elif args.lr_per_batch:
                    lr, run = best_run(baseline, B, grid, args, mu, probe)
                elif B == largest:
                    lr, run = chosen[baseline]
                else:
                    # SGD's step grows with B, so its rate shrinks with B: each sample moves θ as
                    # far; Adam's step does not
                    scale = B / largest if args.sgd else 1
                    lr, run = best_run(baseline, B, [chosen[baseline][0] * scale], args, mu, probe)
                runs[B, baseline] = (run, probe)
                when = reached(run["tvd"] if below else run["E"], B, below, threshold)
                never = (when == math.inf).double().mean().item()
                m, lo, hi = interval(when)
                k, klo, khi = interval(run["kl"][-1])
                print(f"  B = {B:4}  {'GDC++' if baseline else 'GDC  '}  {m:8.0f} [{lo:.0f}, "
                      f"{hi:.0f}]  never {never:4.0%}  D_KL {k:.3f} [{klo:.3f}, {khi:.3f}]  "
                      f"rate {lr:.3g}")
        print_mechanism(runs, (min(sizes), max(sizes)))
        panels.append((name, "tvd" if below else "E", threshold, runs))
    if args.out:
        draw(panels, args.out)
        print(f"wrote {args.out}")


def draw(panels, path):
    """Fig. 4: a panel per target, the metric against training samples, a colour per batch size,
    GDC dashed, GDC++ solid, the median over seeds and its 5%-95% band."""
    import matplotlib
    matplotlib.use("Agg")                                   # files only, no display needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4))
    for ax, (name, key, threshold, runs) in zip(axes, panels):
        sizes = sorted({B for B, _ in runs})
        for (B, baseline), (run, _) in sorted(runs.items()):
            samples = torch.arange(len(run[key])) * B
            band = torch.quantile(run[key], torch.tensor([0.05, 0.5, 0.95], dtype=tx.DT), dim=1)
            colour = f"C{sizes.index(B)}"
            style = "-" if baseline else "--"
            label = f"{'GDC++' if baseline else 'GDC'} B={B}"
            ax.plot(samples, band[1], color=colour, linestyle=style, label=label)
            ax.fill_between(samples, band[0], band[2], color=colour, alpha=0.1, linewidth=0)
        ax.axhline(threshold, color="grey", linewidth=0.5)
        ax.set(title=name, xlabel="training samples", xscale="log",
               ylabel="TVD(p, π)" if key == "tvd" else "E_π φ")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=72)


def print_mechanism(runs, sizes):
    """Along each run at the smallest and largest batch, medians over seeds: TVD(p, π), the exact
    single-sample Var(G) of both estimators at that π and q, ‖E_q G‖²; and the batch's mean
    advantage over the run (Fig. 2's centring), with the share of batches whose A are all 0."""
    print("  along the runs, medians over seeds: samples, TVD(p,π), single-sample Var(G) of GDC "
          "and of GDC++ at that π and q, ‖E_q G‖²")
    for B in sizes:
        for baseline in (False, True):
            run, probe = runs[B, baseline]
            points = [f"{step * B}: {interval(run['tvd'][step])[0]:.3f}, "
                      f"{interval(run['var_gdc'][i])[0]:.3g}, "
                      f"{interval(run['var_gdcpp'][i])[0]:.3g}, {interval(run['mean2'][i])[0]:.2g}"
                      for i, step in enumerate(probe)]
            print(f"  B = {B:4}  {'GDC++' if baseline else 'GDC  '}  " + " | ".join(points))
    print("  the batch's mean advantage, median [5%, 95%] over steps and seeds; the batches "
          "whose A are all 0")
    for B in sizes:
        for baseline in (False, True):
            A_mean = runs[B, baseline][0]["A_mean"].flatten()
            m, lo, hi = interval(A_mean)
            zero = (A_mean == 0).double().mean().item()
            print(f"  B = {B:4}  {'GDC++' if baseline else 'GDC  '}  {m:.3g} [{lo:.3g}, {hi:.3g}]"
                  f"  all 0: {zero:.0%}")


def main(argv=None):
    cli.run(table, "fig4_exact.py", argv)


if __name__ == "__main__":
    main()
