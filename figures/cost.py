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
from dpg_min import PHASES, BadInput, refuse  # noqa: E402

PAPER = dict(train=6_400_000, q_check=6_400_000, evaluation=2_048 * (12_500 // 10 + 1))


def read_run(run):
    """(flags, rows) of a run folder, or BadInput."""
    try:
        flags = json.load(open(os.path.join(run, "config.json")))["dpg_min"]
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{run!r} holds no readable dpg_min run ({e}): give a run folder") from None
    if not rows or "seconds_update" not in rows[-1]:
        raise BadInput(f"{run!r}'s metrics.jsonl has no phase times: its dpg_min.py was older "
                       f"than the seconds_* keys; run it again")
    return flags, rows


def cost(argv):
    parser = argparse.ArgumentParser(prog="figures/cost.py", description=__doc__.split("\n\n")[0])
    parser.error = refuse
    parser.add_argument("run", metavar="RUN_DIR", help="a dpg_min.py run folder")
    flags, rows = read_run(parser.parse_args(argv).run)
    B = flags["batch_size"]
    K = flags["q_update_interval"]
    steps = rows[-1]["step"]
    seconds = {p: sum(r[f"seconds_{p}"] for r in rows) for p in PHASES}
    checks = steps // K + 1                     # train()'s q-checks: at step 0, every K steps...
    if steps % K:
        checks += 1                             # ...and at the last; each draws K·B samples
    samples = dict(train=B * steps, q_check=K * B * checks,
                   evaluation=flags["eval_samples"] * len(rows))     # an evaluation a row
    n_train = max(samples["train"], 1)              # 0 while a run has logged step 0 alone
    per = dict(train=(seconds["sampling"] + seconds["scoring"] + seconds["update"]) / n_train,
               q_check=seconds["q_check"] / samples["q_check"],
               evaluation=seconds["evaluation"] / samples["evaluation"])
    total = sum(seconds.values())
    print(f"{flags['model']}: B = {B}, T = {flags['seq_len']}, K = {K}, {steps} steps, "
          f"{total:.0f} s in the five phases: "
          + ", ".join(f"{p} {s:.1f} s ({100 * s / total:.0f}%)" for p, s in seconds.items()))
    parts = ", ".join(f"{p} {seconds[p] / n_train:.3g}" for p in ("sampling", "scoring", "update"))
    print(f"per training sample {per['train']:.3g} s ({parts}); per q-check sample "
          f"{per['q_check']:.3g} s; per evaluation sample {per['evaluation']:.3g} s")
    paper = sum(PAPER[k] * per[k] for k in PAPER)
    print(f"the paper's budget at these costs (this run's T and machine; cost taken as linear in "
          f"the samples): {paper:.3g} s, {paper / 86_400:.1f} days")


def main(argv=None):
    try:
        cost(sys.argv[1:] if argv is None else argv)
    except BadInput as e:
        print(f"cost.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
