"""dpg_min.py's `train` timed at the paper's shape, no download needed: GPT-2 small's architecture
(GPT2Config(): 12 layers, 768 wide) with random weights and a made-up vocabulary of 50,257 words
(speed does not depend on the weights), SmolLM2-135M (--model smollm2) or the tiny model, for a
short slice of steps with the paper's flags. It prints each phase's seconds, training samples/s,
the sampler's ms per token against its bound 2·N·f/R (N parameters, f rows a forward pass, R this
device's float32 matmul rate, measured here), peak memory, and what the paper's whole GDC++ run
would take at these costs (figures/cost.py).

    python figures/gpu_bench.py --device cuda              # GPT-2's shape, B = 512, T = 40, K = 10
    python figures/gpu_bench.py --model smollm2 --batch-size 256 --seq-len 20 --device cuda
"""
import argparse
import math
import os
import resource
import sys
import tempfile
import time

import torch

FIGURES = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(FIGURES))                    # dpg_min.py, one folder up
sys.path.insert(0, FIGURES)
import cli  # noqa: E402
import cost  # noqa: E402
import dpg_min as dm  # noqa: E402


def gpt2_shaped():
    """GPT-2 small's architecture, random, and 50,257 tokens: the tiny model's words, w0, w1..."""
    words = dm.tiny_vocab()
    words += [f"w{i}" for i in range(50_257 - 2 - len(words))]  # + <|endoftext|> and <unk>
    return dm.build_tiny(words, n_layer=12, n_embd=768, n_head=12, n_positions=1024)


def matmul_rate(device):
    """R: float32 FLOP/s of a large square torch.mm on this device (a warm-up call, then 5)."""
    n = 8192 if device.startswith("cuda") else 1024
    x = torch.randn(n, n, device=device)
    torch.mm(x, x)
    start = dm.clock()
    for _ in range(5):
        torch.mm(x, x)
    return 5 * 2 * n**3 / (dm.clock() - start)


def bench(argv):
    parser = argparse.ArgumentParser(prog="figures/gpu_bench.py",
                                     description=__doc__.split("\n\n")[0])
    parser.error = dm.refuse
    parser.add_argument("--model", default="gpt2-shaped", help="gpt2-shaped, smollm2 or tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=dm.POSITIVE, default=10, help="the slice timed [10]")
    for name, default in (("batch_size", 512), ("seq_len", 40), ("forward_batch_size", 32),
                          ("q_update_interval", 10), ("eval_interval", 10),
                          ("eval_samples", 2048), ("diversity_samples", 500)):
        parser.add_argument(dm.flag(name), type=dm.POSITIVE, default=default,
                            help=f"as dpg_min.py's (the paper's: {default})")
    args = parser.parse_args(argv)
    if args.model == "gpt2-shaped":
        a, tokenizer = gpt2_shaped()
    else:
        a, tokenizer = dm.load_lm(args.model)
    N = sum(p.numel() for p in a.parameters())
    R = matmul_rate(args.device)
    out = os.path.join(tempfile.mkdtemp(prefix="gpu_bench-"), "run")
    flags = {k: v for k, v in vars(args).items() if k != "model"}
    cfg = dm.Config(model=args.model, task="amazing", baseline=True, out=out, **flags)
    task = dm.load_task(cfg)
    dm.check_flags(cfg, task)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _, last = dm.train(cfg, task, a, tokenizer, log=lambda line: None)
    seconds = time.perf_counter() - start
    if args.device.startswith("cuda"):
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident"
    B = args.batch_size
    T = args.seq_len
    f = args.forward_batch_size
    sampling = sum(row["seconds_sampling"] for row in cost.read_run(out)[1])
    per_token = sampling / (args.steps * T * math.ceil(B / f))   # a forward pass of f rows
    print(f"{args.model}: N = {N / 1e6:.1f}M parameters on {args.device}, R = {R / 1e12:.3g} "
          f"TFLOP/s (float32 torch.mm); {args.steps} steps in {seconds:.1f} s, "
          f"{args.steps * B / seconds:.3g} training samples/s; peak memory {peak}")
    print(f"sampling: {1e3 * per_token:.3g} ms per token step of f = {f} rows, "
          f"{per_token * R / (2 * N * f):.3g}× its bound 2·N·f/R = {1e3 * 2 * N * f / R:.3g} ms")
    cost.cost([out])
    return last


def main(argv=None):
    cli.run(bench, "gpu_bench.py", argv)


if __name__ == "__main__":
    main()
