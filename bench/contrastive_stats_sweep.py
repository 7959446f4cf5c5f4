"""Seed sweep of the symmetric contrastive gradients against the tolerance table (statistics layout, docs/...).

    python -m bench.contrastive_stats_sweep                      # 30 seeds, torch + triton (interpreter on CPU)
    python -m bench.contrastive_stats_sweep --seeds 60 --backends torch --case 0

The case is a row of tests/test_contrastive_triton.py's SYMMETRIC_CASES (default: the float32 "sum" row, B = M =
40, D = 20, key_ids + logq, temperature 0.1, a 132-SM grid) with its seed replaced by each swept one: per seed and
backend it prints err / bound for the temperature, query and key gradients, where err = rel_err(backend, float64
truth) and bound = K * rel_err(torch float32 reference, truth) + EPS (tests/tolerances.py; a ratio above 1 fails
the parity test). Then the max and median of each column. Not a CI test: the seeds are the point (~1 s per seed
under the interpreter).
"""
from __future__ import annotations

import argparse
import os
import statistics

if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available():   # before any kernel is defined (as tests/conftest.py does)
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from karma_kernels.contrastive import triton_configs  # noqa: E402
from tests.test_contrastive import make_case, run  # noqa: E402
from tests.test_contrastive_triton import SYMMETRIC_CASES  # noqa: E402
from tests.tolerances import EPS, K, rel_err  # noqa: E402

# index of each checked output in run()'s list: loss, grad_query, grad_keys, grad_temperature, grad_logq
CHECKED = {"dT": 3, "dq": 1, "dk": 2}


def ratios(seed: int, backend: str, case_index: int) -> dict:
    """err / bound of each checked gradient for one seed."""
    batch, dtype, with_ids, with_logq, reduction, sms = SYMMETRIC_CASES[case_index][:6]
    triton_configs.DEFAULT_SMS = sms
    device = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    case = make_case(batch, batch, 20, dtype, symmetric=True, with_ids=with_ids, with_logq=with_logq,
                     reduction=reduction, seed=seed, device=device)
    out, truth, base = run(case, backend), run(case, "truth"), run(case, "same_dtype")
    found = {}
    for name, index in CHECKED.items():
        bound = K[dtype] * rel_err(base[index], truth[index]) + EPS[dtype]
        found[name] = rel_err(out[index], truth[index]) / bound
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=["torch", "triton"])
    parser.add_argument("--case", type=int, default=4, help="index into SYMMETRIC_CASES (default: float32 sum)")
    args = parser.parse_args()
    seeds = range(args.first, args.first + args.seeds)
    for backend in args.backends:
        table = {name: [] for name in CHECKED}
        for seed in seeds:
            found = ratios(seed, backend, args.case)
            print(f"{backend:6s} seed {seed:3d}  " + "  ".join(f"{k} {v:.3f}" for k, v in found.items()),
                  flush=True)
            for name, value in found.items():
                table[name].append(value)
        summary = "  ".join(f"{name} max {max(v):.3f} median {statistics.median(v):.3f}"
                            for name, v in table.items())
        print(f"{backend:6s} {len(seeds)} seeds (err / bound):  {summary}", flush=True)


if __name__ == "__main__":
    main()
