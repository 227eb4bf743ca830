"""Self-BLEU's cost: dpg_min.self_bleu (one pass over the n-grams) against nltk's sentence_bleu of
each text against all the others (what dpg_min did before; quadratic), on samples of T tokens of the
tiny model, with both results compared.

    python figures/self_bleu_bench.py [--texts 100 500 2000] [--old-up-to 500] [--seq-len 40]
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
from dpg_min import load_lm, refuse, sample, self_bleu, tokens_of  # noqa: E402


def nltk_self_bleu(texts, ns=(3, 4, 5)):
    """Each text's nltk sentence_bleu against all the others (word tokens, method1), averaged."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    tokens = [tokens_of(t) for t in texts]
    scores = []
    for i, hypothesis in enumerate(tokens):
        others = tokens[:i] + tokens[i + 1:]
        bleu = sentence_bleu(others, hypothesis, [(1 / n,) * n for n in ns],
                             smoothing_function=SmoothingFunction().method1)
        scores.append(bleu if isinstance(bleu, list) else [bleu] * len(ns))    # nltk: a bare 0
    return [sum(column) / len(scores) for column in zip(*scores)]


def timed(f, texts):
    t0 = time.perf_counter()
    result = f(texts)
    return result, time.perf_counter() - t0


def bench(argv):
    parser = argparse.ArgumentParser(prog="figures/self_bleu_bench.py",
                                     description=__doc__.split("\n\n")[0])
    parser.error = refuse
    parser.add_argument("--texts", type=int, nargs="+", default=[100, 500, 2000],
                        help="numbers of texts [default: 100 500 2000]")
    parser.add_argument("--old-up-to", type=int, default=500,
                        help="time nltk's way only up to this many texts (2,000: ~10 min) [500]")
    parser.add_argument("--seq-len", type=int, default=40, help="T [default: 40]")
    args = parser.parse_args(argv)
    if min(*args.texts, args.seq_len) <= 1:
        refuse("--texts and --seq-len must be above 1")
    torch.set_num_threads(1)
    a, tokenizer = load_lm("tiny")
    torch.manual_seed(0)
    ids, _ = sample(a, max(args.texts), args.seq_len, tokenizer.bos_token_id, chunk=500)
    texts = tokenizer.batch_decode(ids[:, 1:].tolist())
    print("texts  nltk (s)  dpg_min (s)  Self-BLEU-3/4/5            largest difference")
    for n in args.texts:
        new, new_s = timed(self_bleu, texts[:n])
        line = f"{n:>5}  "
        if n <= args.old_up_to:
            old, old_s = timed(nltk_self_bleu, texts[:n])
            gap = max(abs(x - y) for x, y in zip(new, old))
            line += f"{old_s:>8.2f}  {new_s:>11.3f}  {'/'.join(f'{x:.6f}' for x in new)}  {gap:.1e}"
        else:
            line += f"{'-':>8}  {new_s:>11.3f}  {'/'.join(f'{x:.6f}' for x in new)}"
        print(line, flush=True)


def main(argv=None):
    cli.run(bench, "self_bleu_bench.py", argv)


if __name__ == "__main__":
    main()
