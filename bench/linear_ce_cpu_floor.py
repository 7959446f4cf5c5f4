"""linear_cross_entropy's CPU path against its physical floor: the three plain GEMMs of a forward + backward.

    python -m bench.linear_ce_cpu_floor                          # N=4096, D=512, V=32000 fp32 (the target case)
    python -m bench.linear_ce_cpu_floor --n 1024 --v 256000      # the large-vocabulary case
    python -m bench.linear_ce_cpu_floor --rounds 7 --no-native
    python -m bench.linear_ce_cpu_floor --rows 64 128             # also the CPU path at fixed chunk sizes

Per round, in alternation (so machine load hits every contender alike): one forward + backward of the op
(``backend="torch"``), the three GEMMs of the same shapes (``h @ W.T``, ``dz @ W``, ``dz.T @ h``, with the
[N, V] operands preallocated outside the timing), and torch 2.13's chunked ``F.linear_cross_entropy``. Reported:
median seconds of each and the op / GEMMs ratio (of the medians, and the median of per-round ratios). Peak memory
(resident-set growth, ``bench/_mem.py``) of the op and of torch's chunked op, each measured in a call of its own.
Target (issue 12): op <= 1.15x the GEMMs at N=4096, D=512, V=32000 fp32, at <= torch's chunked op's memory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench._mem import peak_memory
from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce import torch_impl


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linear_ce_cpu_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-native", action="store_true", help="skip torch's chunked F.linear_cross_entropy")
    parser.add_argument("--rows", type=int, nargs="*", default=[],
                        help="also time the torch path's chunk loop at these chunk sizes (default: its own rule)")
    args = parser.parse_args(argv)
    n, d, v = args.n, args.d, args.v
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen)

    def op():
        hidden.grad = weight.grad = None
        linear_cross_entropy(hidden, weight, target, backend="torch").backward()

    native = None
    if not args.no_native and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()

        def native():
            hidden.grad = weight.grad = None
            F.linear_cross_entropy(hidden, weight, target, options=options).backward()

    h, w = hidden.detach(), weight.detach()
    logits = torch.empty(n, v)
    dz = torch.randn(n, v, generator=gen)
    grad_h, grad_w = torch.empty(n, d), torch.empty(v, d)

    def gemms():
        torch.mm(h, w.T, out=logits)
        torch.mm(dz, w, out=grad_h)
        torch.mm(dz.T, h, out=grad_w)

    contenders = {"op": op, "gemms": gemms}
    for rows in args.rows:
        def fixed(rows=rows):  # the op's forward + backward work: the chunk loop with gradients for upstream 1/n
            torch_impl.chunked_linear_cross_entropy(h, w, target, grad_scale=1.0 / n, need_grad_hidden=True,
                                                    need_grad_weight=True, chunk_rows=rows)
        contenders[f"op@{rows}rows"] = fixed
    if native is not None:
        contenders["torch_native"] = native
    for fn in contenders.values():     # warm-up
        fn()
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            times[name].append(_timed(fn))
    del logits, dz
    memory = {}
    for name in ("op", "torch_native", *(f"op@{rows}rows" for rows in args.rows)):
        if name in contenders:
            memory[name] = peak_memory(contenders[name], torch.device("cpu"))[1]

    print(f"linear_cross_entropy CPU fwd+bwd, N={n} D={d} V={v} fp32, {args.rounds} alternating rounds, "
          f"{torch.get_num_threads()} threads, chunks of {torch_impl.default_chunk_rows(n, v, d)} rows")
    for name, values in times.items():
        mem = memory.get(name)
        mem_text = f", peak {mem / 2 ** 20:.1f} MiB" if mem is not None else ""
        print(f"  {name:13s} median {statistics.median(values):.3f} s  (min {min(values):.3f}){mem_text}")
    for name in [key for key in times if key.startswith("op")]:
        ratio = statistics.median(times[name]) / statistics.median(times["gemms"])
        per_round = statistics.median(a / b for a, b in zip(times[name], times["gemms"]))
        print(f"  {name} / 3 GEMMs: {ratio:.3f}x (median of per-round ratios {per_round:.3f}x)")
    if "torch_native" in memory and memory["torch_native"]:
        for name in [key for key in memory if key.startswith("op")]:
            print(f"  {name} memory / torch_native memory: {memory[name] / memory['torch_native']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
