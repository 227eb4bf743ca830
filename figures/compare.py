"""The end of dpg_min.py runs side by side with their original LM a: each saved π reloaded by
from_pretrained, N fresh exact samples of it and of a, their metrics (§4.2) as a Markdown table,
and the first few samples of each.

    python figures/compare.py RUN_DIR [RUN_DIR ...] [--samples 500] [--show 5] [--seed 0]
"""
import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dpg_min.py
sys.path.append(os.path.dirname(os.path.abspath(__file__)))          # cli.py, here
import cli  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from dpg_min import (SENTIMENT, Config, Target, evaluate, fmt,  # noqa: E402
                     load_classifier, load_lm, load_task, method_name, read_checkpoint, refuse,
                     saved_flags, task_words)

KEYS = ("E_pi_phi", "kl_pi_a", "kl_p_pi_on_pi", "self_bleu_3", "self_bleu_4", "self_bleu_5",
        "distinct_1", "distinct_2", "distinct_3")


def parse(argv):
    parser = argparse.ArgumentParser(prog="figures/compare.py",
                                     description=__doc__.split("\n\n")[0])
    parser.error = refuse
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="output folders of finished dpg_min.py runs of one --model and task")
    parser.add_argument("--samples", type=int, default=500,
                        help="samples of each model, all in Self-BLEU-n and Distinct-n (as GDC's "
                             "metrics.py) [default: 500]")
    parser.add_argument("--show", type=int, default=5, help="samples of each to print [default: 5]")
    parser.add_argument("--seed", type=int, default=0, help="random seed [default: 0]")
    args = parser.parse_args(argv)
    if args.samples <= 0 or args.show < 0:
        refuse("--samples must be a positive integer and --show 0 or more")
    return args


def compare(argv):
    args = parse(argv)
    saved = [saved_flags(run) for run in args.runs]
    if None in saved:
        refuse(f"{args.runs[saved.index(None)]!r} holds no dpg_min run (config.json)")
    cfgs = [Config(**flags) for flags in saved]
    if len({(c.model, c.task, c.word, c.wordlist, c.moments, c.seq_len) for c in cfgs}) > 1:
        refuse("the runs differ in --model, task or --seq-len: compare runs of one model and task")
    cfg = replace(cfgs[0], diversity_samples=args.samples)
    ckpts = [read_checkpoint(run) for run in args.runs]
    task = load_task(cfg)
    a, tokenizer = load_lm(cfg.model, task_words(task))
    classify = None
    if any(f.startswith(SENTIMENT) for f in task.features):
        classify = load_classifier(cfg.classifier, "cpu")
    rows = []
    shown = []
    models = [("a", None, ckpts[0])] + list(zip(map(method_name, cfgs), args.runs, ckpts))
    for name, path, ckpt in models:
        model = a
        if path:
            model = AutoModelForCausalLM.from_pretrained(path).eval()   # π as the run saved it
        torch.manual_seed(args.seed)
        # λ of the soft features (none on a pointwise task): p is the run's own
        target = Target(a, tokenizer, task, classify, ckpt["lam"].cpu())
        texts, m = evaluate(model, target, args.samples, cfg)
        cells = [name, path or os.path.basename(cfg.model)] + [fmt(m[k]) for k in KEYS]
        rows.append("| " + " | ".join(cells) + " |")
        shown.append(f"\n{name}:" + "".join(f"\n    {t!r}" for t in texts[:args.show]))
    print(f"{args.samples} exact samples of T = {cfg.seq_len} tokens from each model, seed "
          f"{args.seed}; KL(p‖π) on them, self-normalised (each model's mean of P/π)\n")
    print("| model | from | " + " | ".join(KEYS) + " |\n|" + "---|" * (len(KEYS) + 2))
    print("\n".join(rows + shown))


def main(argv=None):
    cli.run(compare, "compare.py", argv)


if __name__ == "__main__":
    main()
