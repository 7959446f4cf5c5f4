"""ShardedIndex search, cpu path vs cuda path, on the same machine: S exact Flat shards, Q queries, top-k.

impls:
  threads  the cpu path: CPU faiss shards searched in threads, C++ topk_merge (numpy queries in, numpy out)
  cuda     the cuda path: faiss GPU Flat shards, all on device 0, torch CUDA queries in and CUDA results out,
           CUDA topk_merge (needs faiss-gpu; skipped with ShardedIndex's reason otherwise)

Target (read off the report, never asserted): GPU machine, N=1,000,000 items, D=64, Q=10,000 queries, k=100,
S=8: cuda >= 10x faster than threads. Peak memory of the cuda case is the torch allocator's (queries' copies,
results, merge); faiss's own GPU memory (the shards, its scratch) is not in it (``mem_note``).
Run: ``pytest bench/bench_sharded_index.py --benchmark-only``; quick: ``KARMA_BENCH_QUICK=1``.
"""
import numpy as np
import pytest

from bench.conftest import HAS_CUDA, QUICK, run_case

faiss = pytest.importorskip("faiss")

if QUICK:
    N, DIM, NUM_QUERIES, K, SHARDS = 20_000, 32, 256, 10, 4
elif HAS_CUDA:
    N, DIM, NUM_QUERIES, K, SHARDS = 1_000_000, 64, 10_000, 100, 8
else:
    N, DIM, NUM_QUERIES, K, SHARDS = 200_000, 64, 1_000, 100, 8
SHAPE = f"N={N},D={DIM},Q={NUM_QUERIES},k={K},S={SHARDS}"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((N, DIM), dtype=np.float32),
            rng.standard_normal((NUM_QUERIES, DIM), dtype=np.float32))


def _record(benchmark):
    benchmark.extra_info["baseline"] = "threads"
    if benchmark.extra_info.get("time_s"):
        benchmark.extra_info["queries_per_s"] = NUM_QUERIES / benchmark.extra_info["time_s"]


def test_cpu_path(benchmark, data):
    from karma.retrieval import ShardedIndex

    vectors, queries = data
    index = ShardedIndex.build(vectors, SHARDS, metric="ip", device="cpu")
    run_case(benchmark, lambda: index.search(queries, K), op="sharded_index", impl="threads", shape=SHAPE,
             size=N * NUM_QUERIES, dtype="float32", device="cpu", warmup_rounds=1)
    _record(benchmark)
    index.close()


def test_cuda_path(benchmark, data):
    import torch

    from karma.retrieval import ShardedIndex, why_not_gpu

    reason = why_not_gpu()
    if reason is not None:
        pytest.skip(f"the cuda path cannot run here: {reason}")
    vectors, queries = data
    index = ShardedIndex.build(vectors, SHARDS, metric="ip", device="cuda", gpus=[0])
    on_device = torch.from_numpy(queries).cuda()
    run_case(benchmark, lambda: index.search(on_device, K), op="sharded_index", impl="cuda", shape=SHAPE,
             size=N * NUM_QUERIES, dtype="float32", device="cuda", warmup_rounds=1,
             mem_note="torch allocator only; faiss's GPU memory (shards, scratch) is not counted")
    _record(benchmark)
