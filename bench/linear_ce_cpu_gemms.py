"""The linear-CE CPU path's three per-chunk matmuls against their full-size twins, per chunk size and orientation.

    python -m bench.linear_ce_cpu_gemms                        # N=1024 rows, D=512, V=32000, chunks 32..256
    python -m bench.linear_ce_cpu_gemms --rows 64 256 --reps 5

What sets the torch path's chunk size (``torch_impl.default_chunk_rows``): each chunk's matmul re-packs W (or
re-writes the [V, D] weight gradient) for chunk-many rows of work. For N rows in chunks of C, per orientation:
logits ``h_c @ W.T`` into [C, V] (``logits``) or ``W @ h_c.T`` into [V, C] (``logitsT``); dHidden ``dz @ W`` with
dz [C, V] (``dH``) or [V, C] (``dH_dzT``); the weight-gradient update ``dW.addmm_(dz.T, h_c)`` (``dW``) or with
dz [V, C] (``dW_dzT``). Each is printed as its time over the full-size matmul's ([N, D]·[D, V], [N, V]·[V, D],
[V, N]·[N, D]). One thread, timed by the thread's CPU time (the time it was scheduled for: stable on a loaded
machine), fastest of ``--reps`` alternating rounds.
"""
from __future__ import annotations

import argparse
import time

import torch


def _cpu_time(fn) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def _chunked(h, w, c, out, grad_h, grad_w) -> dict:
    """orientation -> a callable running that matmul over all rows of ``h`` in chunks of ``c``."""
    n, v = h.shape[0], w.shape[0]
    gen = torch.Generator().manual_seed(1)
    dz = torch.randn(c, v, generator=gen)
    dz_t = dz.T.contiguous()
    logits, logits_t = out[: c * v].view(c, v), out[: c * v].view(v, c)
    chunks = [slice(s, s + c) for s in range(0, n - c + 1, c)]

    def loop(body):
        return lambda: [body(rows) for rows in chunks]

    return {
        "logits": loop(lambda rows: torch.mm(h[rows], w.T, out=logits)),
        "logitsT": loop(lambda rows: torch.mm(w, h[rows].T, out=logits_t)),
        "dH": loop(lambda rows: torch.mm(dz, w, out=grad_h[rows])),
        "dH_dzT": loop(lambda rows: torch.mm(dz_t.T, w, out=grad_h[rows])),
        "dW": loop(lambda rows: grad_w.addmm_(dz.T, h[rows])),
        "dW_dzT": loop(lambda rows: grad_w.addmm_(dz_t, h[rows])),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linear_ce_cpu_gemms", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64, 96, 128, 192, 256])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the thread's CPU time is the matmul's only when the matmul runs on this thread
    n, d, v = args.n, args.d, args.v
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen) / d ** 0.5
    dz_full = torch.randn(n, v, generator=gen)
    out, grad_h, grad_w = torch.empty(n * v), torch.empty(n, d), torch.empty(v, d)
    contenders = {
        "full logits": lambda: torch.mm(h, w.T, out=out.view(n, v)),
        "full dH": lambda: torch.mm(dz_full, w, out=grad_h),
        "full dW": lambda: torch.mm(dz_full.T, h, out=grad_w),
    }
    for c in args.rows:
        for name, fn in _chunked(h, w, c, out, grad_h, grad_w).items():
            contenders[f"{c} {name}"] = fn
    for fn in contenders.values():  # warm-up
        fn()
    best = {name: float("inf") for name in contenders}
    for _ in range(args.reps):
        for name, fn in contenders.items():
            best[name] = min(best[name], _cpu_time(fn))
    print(f"per-chunk matmuls / full-size matmul, N={n} D={d} V={v} fp32, 1 thread, CPU time, best of {args.reps}; "
          f"full: " + ", ".join(f"{k.split()[1]} {best[k]:.3f} s" for k in contenders if k.startswith("full")))
    names = ["logits", "logitsT", "dH", "dH_dzT", "dW", "dW_dzT"]
    print("| rows | " + " | ".join(names) + " | mean of logits, dH, dW |")
    print("|---:|" + "---:|" * (len(names) + 1))
    for c in args.rows:
        ratios = {name: best[f"{c} {name}"] * (n // c * c) / n / best[f"full {name.split('_')[0].rstrip('T')}"]
                  for name in names}
        mean = (ratios["logits"] + ratios["dH"] + ratios["dW"]) / 3
        print(f"| {c} | " + " | ".join(f"{ratios[name]:.2f}x" for name in names) + f" | {mean:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
