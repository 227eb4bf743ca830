"""What a GDC++ step and a q-check cost on this machine, timed with the functions dpg_min.train
calls, and what the paper's budget (6.4M samples at B = 512, T = 40, K = 10, 2,048 evaluation
samples every 10 steps) would take.

    python figures/cost.py --model PATH.gguf --batch-size 32 --seq-len 20 \\
        [--q-update-interval 10] [--repeats 2]
"""
import argparse
import copy
import os
import resource
import sys
import time

# dpg_min.py, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from dpg_min import (BadInput, bos_of, dpg_loss, load_lm, refuse, sample,  # noqa: E402
                     sequence_logprob)


def timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def cost(argv):
    parser = argparse.ArgumentParser(prog="figures/cost.py", description=__doc__.split("\n\n")[0])
    parser.error = refuse
    parser.add_argument("--model", default="tiny",
                        help="a, as dpg_min.py's --model [default: tiny]")
    parser.add_argument("--batch-size", type=int, default=32, help="B [default: 32]")
    parser.add_argument("--seq-len", type=int, default=20, help="T [default: 20]")
    parser.add_argument("--q-update-interval", type=int, default=10,
                        help="K: a q-check scores K·B samples [10]")
    parser.add_argument("--repeats", type=int, default=2,
                        help="time each part this many times, keep the least [2]")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.seq_len, args.q_update_interval, args.repeats) <= 0:
        refuse("--batch-size, --seq-len, --q-update-interval and --repeats must be positive "
               "integers")
    a, tokenizer = load_lm(args.model)
    a.eval().requires_grad_(False)
    pi = copy.deepcopy(a).requires_grad_(True)
    B, T, K = args.batch_size, args.seq_len, args.q_update_interval
    opt = torch.optim.Adam(pi.parameters(), lr=1e-6)
    bos = bos_of(tokenizer)

    def step():
        # Algorithm 1 lines 3-6, as train does them for DPG (q = a here)
        ids, logp_q = sample(a, B, T, bos, B)
        log_P = sequence_logprob(a, ids, B)
        opt.zero_grad()
        loss = dpg_loss(sequence_logprob(pi, ids, B), logp_q, log_P, 1.0, True)[0]
        loss.backward()
        opt.step()

    def q_check(score_pi=True):
        # lines 7-10: K·B fresh samples of q, scored by a and π
        ids, _ = sample(a, K * B, T, bos, B)
        with torch.no_grad():
            sequence_logprob(a, ids, B)
            if score_pi:
                sequence_logprob(pi, ids, B)

    def evaluation():
        # samples, scored by a only
        q_check(score_pi=False)

    parts = dict(step=step, q_check=q_check, evaluation=evaluation)
    s = {name: min(timed(f) for _ in range(args.repeats)) for name, f in parts.items()}
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"{args.model}: B = {B}, T = {T}, K = {K}, {torch.get_num_threads()} thread(s), "
          f"least of {args.repeats}: a training step {s['step']:.1f} s; "
          f"a q-check of {K * B} samples {s['q_check']:.1f} s; "
          f"drawing and scoring {K * B} evaluation samples {s['evaluation']:.1f} s; "
          f"peak RSS {peak_gb:.1f} GB")
    print(f"per training sample {s['step'] / B:.3f} s, "
          f"per q-check sample {s['q_check'] / (K * B):.3f} s, "
          f"per evaluation sample {s['evaluation'] / (K * B):.3f} s")


def main(argv=None):
    try:
        cost(sys.argv[1:] if argv is None else argv)
    except BadInput as e:
        print(f"cost.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
