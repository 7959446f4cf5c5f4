"""linear_cross_entropy's CPU path against its physical floor: the three plain GEMMs of a forward + backward.

    python -m bench.linear_ce_cpu_floor                          # N=4096, D=512, V=32000 fp32 (the target case)
    python -m bench.linear_ce_cpu_floor --n 1024 --v 256000      # the large-vocabulary case
    python -m bench.linear_ce_cpu_floor --rounds 7 --no-native --threads 1
    python -m bench.linear_ce_cpu_floor --rows 64 128             # also the CPU path at fixed chunk sizes
    python -m bench.linear_ce_cpu_floor --threads 1 --cpu-time    # on a loaded machine: CPU seconds, 1 thread

Per round, in alternation (so machine load hits every contender alike): one forward + backward of the op
(``backend="torch"``), the three GEMMs of the same shapes (``h @ W.T``, ``dz @ W``, ``dz.T @ h``, with the
[N, V] operands preallocated outside the timing), and torch 2.13's chunked ``F.linear_cross_entropy``. Reported:
median seconds of each and the op / GEMMs ratio (of the medians, and the median of per-round ratios).

Peak memory (resident-set growth, ``bench/_mem.py``): every contender the same way, each in a fresh process of its
own (``--peak-of NAME``) that builds the same inputs, calls the contender once (a warm-up: one-time
allocations such as the BLAS's packing buffers and the thread pool's stacks happen there), drops the gradients it
left on the inputs and reads the peak of a second call. (Read in the timing process, a call could reuse pages an
earlier call freed, e.g. the gradients it replaces, and read low: the op once read 8 MiB there.)
Target (issue 12): op <= 1.15x the GEMMs at N=4096, D=512, V=32000 fp32, at <= torch's chunked op's memory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench._mem import peak_memory
from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce import torch_impl


def _timed(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.linear_ce_cpu_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the process's CPU time (all threads) instead of the wall clock: on a loaded "
                             "machine with --threads 1, the time the op was actually scheduled for")
    parser.add_argument("--no-native", action="store_true", help="skip torch's chunked F.linear_cross_entropy")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory readings")
    parser.add_argument("--rows", type=int, nargs="*", default=[],
                        help="also time the torch path's chunk loop at these chunk sizes (default: its own rule)")
    parser.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # internal: one peak reading, as JSON
    return parser


def _contenders(args, with_gemms: bool):
    """(name -> a zero-argument callable running one forward + backward of that contender on fixed inputs,
    a callable dropping the gradients the last call left on the inputs)."""
    n, d, v = args.n, args.d, args.v
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen)
    h, w = hidden.detach(), weight.detach()

    def op():
        hidden.grad = weight.grad = None
        linear_cross_entropy(hidden, weight, target, backend="torch").backward()

    contenders = {"op": op}
    if with_gemms:
        logits = torch.empty(n, v)
        dz = torch.randn(n, v, generator=gen)
        grad_h, grad_w = torch.empty(n, d), torch.empty(v, d)

        def gemms():
            torch.mm(h, w.T, out=logits)
            torch.mm(dz, w, out=grad_h)
            torch.mm(dz.T, h, out=grad_w)

        contenders["gemms"] = gemms
    for rows in args.rows:
        def fixed(rows=rows):  # the op's forward + backward work: the chunk loop with gradients for upstream 1/n
            torch_impl.chunked_linear_cross_entropy(h, w, target, grad_scale=1.0 / n, need_grad_hidden=True,
                                                    need_grad_weight=True, chunk_rows=rows)
        contenders[f"op@{rows}rows"] = fixed
    if not args.no_native and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()

        def native():
            hidden.grad = weight.grad = None
            F.linear_cross_entropy(hidden, weight, target, options=options).backward()

        contenders["torch_native"] = native

    def drop_grads():
        hidden.grad = weight.grad = None

    return contenders, drop_grads


def _peak_in_fresh_process(name: str, argv) -> float | None:
    """Peak bytes of contender ``name``'s second call, read in a new interpreter (see the module docstring)."""
    command = [sys.executable, "-m", "bench.linear_ce_cpu_floor", *argv, "--peak-of", name]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of:
        contenders, drop_grads = _contenders(args, with_gemms=False)
        fn = contenders[args.peak_of]
        fn()  # warm-up
        drop_grads()  # else the call frees the warm-up's gradients and re-fills their pages: no growth seen
        print(json.dumps({"peak_bytes": peak_memory(fn, torch.device("cpu"))[1]}))
        return 0

    n, d, v = args.n, args.d, args.v
    contenders, _ = _contenders(args, with_gemms=True)
    for fn in contenders.values():     # warm-up
        fn()
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            times[name].append(_timed(fn, time.process_time if args.cpu_time else time.perf_counter))
    del contenders
    memory = {}
    if not args.no_memory:
        for name in times:
            if name != "gemms":
                memory[name] = _peak_in_fresh_process(name, argv)

    print(f"linear_cross_entropy CPU fwd+bwd, N={n} D={d} V={v} fp32, {args.rounds} alternating rounds, "
          f"{torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall-clock'} time, chunks of {torch_impl.default_chunk_rows(n, v, d)} rows")
    for name, values in times.items():
        mem = memory.get(name)
        mem_text = f", peak {mem / 2 ** 20:.1f} MiB" if mem is not None else ""
        print(f"  {name:13s} median {statistics.median(values):.3f} s  (min {min(values):.3f}){mem_text}")
    for name in [key for key in times if key.startswith("op")]:
        ratio = statistics.median(times[name]) / statistics.median(times["gemms"])
        per_round = statistics.median(a / b for a, b in zip(times[name], times["gemms"]))
        print(f"  {name} / 3 GEMMs: {ratio:.3f}x (median of per-round ratios {per_round:.3f}x)")
    if memory.get("torch_native"):
        for name in [key for key in memory if key.startswith("op") and memory[key] is not None]:
            print(f"  {name} memory / torch_native memory: {memory[name] / memory['torch_native']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
