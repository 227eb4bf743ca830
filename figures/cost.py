"""What a run's samples cost, from the seconds that its metrics.jsonl records for each phase (the
training batches' sampling, scoring and update, the q-checks, the evaluations), and what the paper's
budget would take at the same cost per sample: 6.4M training samples at B = 512, as many q-check
samples (K·B every K steps), and 2,048 evaluation samples every 10 steps (12,500 steps).

    python figures/cost.py RUN_DIR      (a dpg_min.py run folder, finished or not)
"""
import argparse
import json
import os
import sys

# dpg_min.py, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))          # cli.py, here
import cli  # noqa: E402
from dpg_min import PHASES, Config, refuse, saved_flags  # noqa: E402

PAPER = dict(train=6_400_000, q_check=6_400_000, evaluation=2_048 * (12_500 // 10 + 1))


def read_run(run):
    """(Config, rows) of a run folder, read as figures/plot.py reads it, or BadInput."""
    try:
        cfg = Config(**saved_flags(run))
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    except (OSError, ValueError, TypeError):
        refuse(f"{run!r} holds no dpg_min run (config.json and metrics.jsonl)")
    if not rows or "seconds_update" not in rows[-1]:
        refuse(f"{run!r}'s metrics.jsonl has no phase times: its dpg_min.py was older than the "
               f"seconds_* keys; run it again")
    return cfg, rows


def cost(argv):
    parser = argparse.ArgumentParser(prog="figures/cost.py", description=__doc__.split("\n\n")[0])
    parser.error = refuse
    parser.add_argument("run", metavar="RUN_DIR", help="a dpg_min.py run folder")
    cfg, rows = read_run(parser.parse_args(argv).run)
    B = cfg.batch_size
    K = cfg.q_update_interval
    steps = rows[-1]["step"]
    seconds = {p: sum(r[f"seconds_{p}"] for r in rows) for p in PHASES}
    checks = steps // K + 1                     # train()'s q-checks: at step 0, every K steps...
    if steps % K:
        checks += 1                             # ...and at the last; each draws K·B samples
    samples = dict(train=B * steps, q_check=K * B * checks,
                   evaluation=cfg.eval_samples * len(rows))     # an evaluation a row
    n_train = max(samples["train"], 1)              # 0 while a run has logged step 0 alone
    per = dict(train=(seconds["sampling"] + seconds["scoring"] + seconds["update"]) / n_train,
               q_check=seconds["q_check"] / samples["q_check"],
               evaluation=seconds["evaluation"] / samples["evaluation"])
    total = sum(seconds.values())
    print(f"{cfg.model}: B = {B}, T = {cfg.seq_len}, K = {K}, {steps} steps, "
          f"{total:.0f} s in the five phases: "
          + ", ".join(f"{p} {s:.1f} s ({100 * s / total:.0f}%)" for p, s in seconds.items()))
    parts = ", ".join(f"{p} {seconds[p] / n_train:.3g}" for p in ("sampling", "scoring", "update"))
    print(f"per training sample {per['train']:.3g} s ({parts}); per q-check sample "
          f"{per['q_check']:.3g} s; per evaluation sample {per['evaluation']:.3g} s")
    paper = sum(PAPER[k] * per[k] for k in PAPER)
    print(f"the paper's budget at these costs (this run's T and machine; cost taken as linear in "
          f"the samples): {paper:.3g} s, {paper / 86_400:.1f} days")


def main(argv=None):
    cli.run(cost, "cost.py", argv)


if __name__ == "__main__":
    main()
