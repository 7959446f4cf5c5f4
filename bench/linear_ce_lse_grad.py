"""What a differentiable lse costs on linear_cross_entropy's CPU path (issue 15).

    python -m bench.linear_ce_lse_grad                       # N=1024, D=256, V=8192 fp32, 1 thread
    python -m bench.linear_ce_lse_grad --n 2048 --v 32000 --rounds 7

Per round, in alternation (machine load hits every contender alike), one forward + backward of:
  plain           ``loss.backward()`` (the forward precomputes the gradients: 3 matmuls)
  lse_merged      ``(loss + 1e-4 * lse.square().mean()).backward()`` (the default: one merged recomputing backward)
  lse_precompute  the same with the precomputed loss gradients and a separate lse backward (the alternative)
Reported: the median seconds of each and the ratio to plain.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import karma_kernels.linear_ce.op as lce_op
from karma_kernels import linear_cross_entropy


def _step(hidden, weight, target, with_lse: bool) -> float:
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    start = time.perf_counter()
    if with_lse:
        loss, lse = linear_cross_entropy(hidden, weight, target, backend="torch", return_lse=True)
        (loss + 1e-4 * lse.square().mean()).backward()
    else:
        linear_cross_entropy(hidden, weight, target, backend="torch").backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--v", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    hidden = torch.randn(args.n, args.d)
    weight = torch.randn(args.v, args.d) / args.d ** 0.5
    target = torch.randint(0, args.v, (args.n,))
    times = {"plain": [], "lse_merged": [], "lse_precompute": []}
    default = lce_op.PRECOMPUTE_SKIPPED_FOR_LSE
    try:
        for _ in range(args.rounds):
            for name in times:
                lce_op.PRECOMPUTE_SKIPPED_FOR_LSE = name != "lse_precompute"
                times[name].append(_step(hidden, weight, target, with_lse=name != "plain"))
    finally:
        lce_op.PRECOMPUTE_SKIPPED_FOR_LSE = default
    plain = statistics.median(times["plain"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:15s} {median:.4f} s  {median / plain:.2f}x plain")


if __name__ == "__main__":
    main()
