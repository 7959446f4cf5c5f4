"""topk_merge against faiss.merge_knn_results, call for call: the measurement behind the CPU target.

A shared machine drifts over seconds, so the two are timed in alternation (ours, faiss, ours, ...) after warm-up
calls, and the ratio is taken between their medians (and between their fastest calls). The pytest-benchmark
file times each implementation in its own block of rounds, minutes apart from the other's; use this script
for the ratio.

    python -m bench.topk_merge_vs_faiss                  # S=8, Q=20000, k=100, torch's thread count
    python -m bench.topk_merge_vs_faiss --threads 1 --shards 64 --queries 1000 --k 10
    python -m bench.topk_merge_vs_faiss --queries 1 --k 10 --calls 3000 --warmup 300   # the serving case
    python -m bench.topk_merge_vs_faiss --queries 1 --k 10 --calls 3000 --warmup 300 --torch

Times are whole calls from Python, numpy in and out, as a caller sees them (ours includes its wrapper); with
--torch ours takes and returns CPU tensors (views of the same arrays), faiss still numpy.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from karma_kernels import topk_merge


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for both (torch.set_num_threads and faiss.omp_set_num_threads)")
    parser.add_argument("--calls", type=int, default=40, help="timed calls of each, alternating")
    parser.add_argument("--warmup", type=int, default=8, help="untimed calls of each first")
    parser.add_argument("--torch", action="store_true", help="ours on torch CPU tensors instead of numpy arrays")
    args = parser.parse_args(argv)
    for name in ("shards", "queries", "k", "threads", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    try:
        import faiss
    except ImportError:
        parser.error("faiss is not installed (pip install faiss-cpu)")

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    shape = (args.shards, args.queries, args.k)
    distances = np.sort(rng.random(shape, dtype=np.float32), axis=2)  # rows as a search returns them
    ids = rng.integers(0, 2**40, shape, dtype=np.int64)
    ours_in = (torch.from_numpy(distances), torch.from_numpy(ids)) if args.torch else (distances, ids)
    calls = {"karma": lambda: topk_merge(*ours_in, args.k),
             "faiss": lambda: faiss.merge_knn_results(distances, ids, keep_max=False)}
    ours, theirs = calls["karma"](), calls["faiss"]()
    if not np.array_equal(np.asarray(ours[0]), theirs[0]):
        raise SystemExit("the two disagree on the merged distances")
    for fn in calls.values():
        for _ in range(args.warmup):
            fn()
    times = {name: [] for name in calls}
    for _ in range(args.calls):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"S={args.shards} Q={args.queries} k={args.k}, {args.threads} thread(s), {args.calls} alternating calls"
          + (", ours on torch tensors" if args.torch else ""))
    scale, unit = (1e6, "us") if np.median(times["faiss"]) < 1e-3 else (1e3, "ms")
    for name, values in times.items():
        t = np.asarray(values) * scale
        print(f"  {name:6s} median {np.median(t):8.2f} {unit}   fastest {t.min():8.2f} {unit}   "
              f"p90 {np.percentile(t, 90):8.2f} {unit}")
    median_ratio = np.median(times["faiss"]) / np.median(times["karma"])
    fastest_ratio = min(times["faiss"]) / min(times["karma"])
    print(f"  faiss / karma: {median_ratio:.2f}x (medians), {fastest_ratio:.2f}x (fastest calls)")


if __name__ == "__main__":
    main()
