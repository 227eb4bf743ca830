"""The paper's figures from the logs of dpg_min.py runs: a panel per metric, a line per run (and per
feature of E_π φ) against training samples, and a Markdown table of the runs on stdout.

    python figures/plot.py RUN_DIR [RUN_DIR ...] --out figures/fig.png \\
        [--metrics E_pi_phi,kl_p_pi] [--reach 0.5]
"""
import argparse
import json
import os
import sys

# dpg_min.py, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpg_min import LABELS, BadInput, Config, fmt, method_name, refuse, saved_flags  # noqa: E402

METRICS = "E_pi_phi,kl_p_pi,kl_pi_a,self_bleu_5,distinct_1,tvd_p_pi,mean_abs_A,var_A,var_G"
LAST = ("E_pi_phi", "kl_p_pi", "kl_pi_a", "tvd_p_pi", "self_bleu_5", "distinct_1")
MEANS = ("mean_abs_A", "var_A", "var_G")

def plot(argv):
    """Draw the runs of argv into --out and print their table (see the module's docstring)."""
    parser = argparse.ArgumentParser(prog="figures/plot.py", description=__doc__.split("\n\n")[0])
    parser.error = refuse
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="output folders of dpg_min.py runs")
    parser.add_argument("--out", required=True, metavar="FILE.png",
                        help="the figure to write (PNG, PDF, SVG)")
    parser.add_argument("--metrics", default=METRICS,
                        help=f"keys of metrics.jsonl, comma-separated: {', '.join(LABELS)}")
    parser.add_argument("--reach", type=float, default=0.5,
                        help="the table's samples to E_π φ ≥ this (Fig. 4: 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    runs = []
    for path in args.runs:
        try:
            with open(os.path.join(path, "metrics.jsonl")) as f:
                runs.append((Config(**saved_flags(path)), [json.loads(line) for line in f]))
        except (OSError, ValueError, TypeError):
            refuse(f"{path!r} holds no dpg_min run (config.json and metrics.jsonl)")
    if os.path.exists(args.out) and not args.overwrite:
        refuse(f"--out {args.out!r} already exists; choose a new file, or add --overwrite")
    keys = [k for k in args.metrics.split(",")
            if any(r.get(k) is not None for _, rs in runs for r in rs)]
    if not keys:
        refuse(f"--metrics {args.metrics!r}: none of these is logged by the runs; "
               f"choose from {', '.join(LABELS)}")
    try:
        import matplotlib
        matplotlib.use("Agg")                                   # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        refuse("plot needs matplotlib, which is optional: pip install matplotlib")
    tasks = {c.task for c, _ in runs}
    seeds = sorted({c.seed for c, _ in runs})
    n = len(keys)
    colours = {}
    styles = ("-", "--", ":", "-.")                     # a style per seed, or per feature of E_π φ
    n_rows = -(-n // 3)                                 # three panels a row
    n_cols = min(3, n)
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False, figsize=(4.2 * n_cols, 3.2 * n_rows))
    table = [f"| run | samples | E_π φ | KL(p‖π) | KL(π‖a) | TVD(p,π) | Self-BLEU-5 | Distinct-1 "
             f"| samples to E_π φ ≥ {args.reach:g} | mean \\|A\\| | mean Var(A) | mean Var(G) |\n"
             + "|---" * 12 + "|"]
    # a colour per method (and task), a line style per seed
    for c, rows in runs:
        name = f"{method_name(c)} B={c.batch_size}" + f" {c.task}" * (len(tasks) > 1)
        label = name + f" seed {c.seed}" * (len(seeds) > 1)
        colour = f"C{colours.setdefault(name, len(colours))}"
        seed_style = styles[seeds.index(c.seed) % 4]
        for ax, key in zip(axes.flat, keys):
            points = [(r["samples"], r[key]) for r in rows if r.get(key) is not None]
            lines = []
            if points:
                lines = ax.plot(*zip(*points), color=colour, linestyle=seed_style, label=label)
            for line, feature_style in zip(lines if len(lines) > 1 else [], styles):
                line.set_linestyle(feature_style)               # E_π φ of k features: k lines
            yscale = "log" if key.startswith("var_") else "linear"
            ax.set(title=LABELS.get(key, key), xlabel="training samples", yscale=yscale)
        last = rows[-1]
        means = [[r[k] for r in rows if r.get(k) is not None] for k in MEANS]
        reached = (r["samples"] for r in rows if (r["E_pi_phi"] or [0])[0] >= args.reach)
        hit = next(reached, "never")
        last_cells = ["inf" if last[k] is None else fmt(last[k]) for k in LAST]
        mean_cells = [f"{sum(v) / len(v):.3g}" if v else "-" for v in means]
        table.append(f"| {label} | {last['samples']} | " + " | ".join(last_cells) + f" | {hit} | "
                     + " | ".join(mean_cells) + " |")
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=72)
    # after the figure: a reader who stops early can't stop it
    print("\n".join(table + [f"wrote {args.out}"]))

def main(argv=None):
    try:
        plot(sys.argv[1:] if argv is None else argv)
        # a closed pipe shows here, inside the try, not at exit
        sys.stdout.flush()
    except BadInput as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        # `... | head` stopped reading: the figure is written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

if __name__ == "__main__":
    main()
