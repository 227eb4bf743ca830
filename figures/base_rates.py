"""Base rates E_a φ of the built-in features: the share of exact samples of the original LM a that
meet each one, which tells how far each task has to move a (a feature at 0.1% needs ~1,000 samples
of q per sample with P > 0).

    python figures/base_rates.py --model PATH.gguf --seq-len 40 --samples 1024 [--classifier NAME]
"""
import argparse
import os
import sys
import time

# dpg_min.py, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))          # cli.py, here
import cli  # noqa: E402
import torch  # noqa: E402
from dpg_min import (TASKS, bos_of, load_classifier, load_lm, phi_matrix,  # noqa: E402
                     refuse, sample)

SHOWN = 160                                             # characters of a sample to print


def base_rates(argv):
    parser = argparse.ArgumentParser(prog="figures/base_rates.py",
                                     description=__doc__.split("\n\n")[0])
    parser.error = refuse
    parser.add_argument("--model", default="tiny",
                        help="a, as dpg_min.py's --model [default: tiny]")
    parser.add_argument("--seq-len", type=int, default=40,
                        help="T, tokens after BOS [default: 40]")
    parser.add_argument("--samples", type=int, default=1024,
                        help="samples of a [default: 1024]")
    parser.add_argument("--forward-batch-size", type=int, default=64,
                        help="rows per forward pass [default: 64]")
    parser.add_argument("--seed", type=int, default=0, help="random seed [default: 0]")
    parser.add_argument("--classifier", default="",
                        help="a sentiment classifier, as dpg_min.py's "
                        "(default: none, the sentiment features are left out)")
    args = parser.parse_args(argv)
    if min(args.seq_len, args.samples, args.forward_batch_size) <= 0:
        refuse("--seq-len, --samples and --forward-batch-size must be positive integers")
    features = list(dict.fromkeys(f for task in TASKS.values() for f, _ in task
                                  if args.classifier or not f.startswith("sentiment:")))
    a, tokenizer = load_lm(args.model)
    classify = load_classifier(args.classifier, "cpu") if args.classifier else None
    torch.manual_seed(args.seed)
    t0 = time.time()
    ids, _ = sample(a, args.samples, args.seq_len, bos_of(tokenizer), args.forward_batch_size)
    texts = tokenizer.batch_decode(ids[:, 1:].tolist())     # without the BOS
    phi = phi_matrix(features, texts, classify=classify)
    seconds = time.time() - t0
    print(f"{args.model}: {args.samples} samples of T = {args.seq_len} tokens in {seconds:.0f} s\n")
    print("| feature | base rate E_a φ | samples meeting it | ± 1 s.e. |\n|---|---|---|---|")
    for k, f in enumerate(features):
        rate = phi[:, k].mean().item()
        se = (rate * (1 - rate) / args.samples) ** 0.5
        print(f"| `{f}` | {100 * rate:.2f}% | {int(phi[:, k].sum())} | {100 * se:.2f}% |")
    # one sample meeting each feature, as the feature saw it
    for k, f in enumerate(features):
        hits = [t for t, hit in zip(texts, phi[:, k]) if hit]
        print(f"\n{f}: {hits[0][:SHOWN]!r}" if hits else f"\n{f}: none")


def main(argv=None):
    cli.run(base_rates, "base_rates.py", argv)


if __name__ == "__main__":
    main()
