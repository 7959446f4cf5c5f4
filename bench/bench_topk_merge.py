"""topk_merge: merging S shards' sorted top-k rows into the global top-k per query.

impls:
  cpp           ours, sorted rows (the k-way merge; reads about k + S candidates per query)
  cpp_select    ours, sorted=False (a selection over all S * k candidates)
  cuda          ours on the GPU (CUDA only)
  faiss         faiss.merge_knn_results (the peer; CPU, sorted rows)
  torch_topk    torch.topk over the concatenation of the shards (what users write without a merge)
  reference     karma_kernels' numpy oracle (small cases only: it sorts every candidate)

extra_info: candidates (S * Q * k), candidates_per_s, bytes (candidate bytes the op reads and writes: 12 per
candidate, fp32 + int64, reading about k + S per query for the merge, S * k for the others) and bytes_per_s.
Targets (read off the report, never asserted): CPU S=8, Q=20000, k=100: cpp >= 4x faiss's speed.
GPU Q=10000, S=16, k=100: >= 50% of HBM bandwidth.

Timing is the steady state of a retrieval loop: a few warm-up calls first. The first calls of a process pay a
page fault per 4 KiB of a fresh output (24 MB at Q=20000, k=100: several ms, as much as the merge) until the
allocator starts reusing freed memory; that is the allocator's cost, not the merge's, and faiss's numpy output
pays it too (less: numpy asks for huge pages).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from bench._baselines import TOPK_SHAPE
from bench.conftest import GPU_ONLY, GPU_ONLY_SKIP, HAS_CUDA, QUICK, run_case
from karma_kernels import topk_merge
from karma_kernels.topk_merge import topk_merge_reference

CANDIDATE_BYTES = 12  # float32 distance + int64 id
REFERENCE_MAX_CANDIDATES = 4_000_000

if GPU_ONLY:  # the GPU case alone: the CPU cases (CI's and docs/bench_cpu.md's) skip, saying so
    CASES = [(8, 20000, 100)]
elif QUICK:
    CASES = [(4, 1000, 10), (8, 2000, 100)]
else:
    CASES = [(8, 20000, 100)] + [(s, q, k) for s in (4, 16, 64) for q in (1000, 20000) for k in (10, 100)]
GPU_CASES = [TOPK_SHAPE]  # first in the file: pytest runs it before the CPU cases
CPU_IMPLS = ("cpp", "cpp_select", "faiss", "torch_topk", "reference")
WARMUP_ROUNDS, ROUNDS = (1, 2) if QUICK else (3, 10)  # the reference keeps run_case's defaults: it is slow


@functools.lru_cache(maxsize=2)
def shard_results(num_shards: int, num_queries: int, k: int):
    """(S, Q, k) rows as a search returns them: float32 distances sorted ascending, int64 global ids."""
    rng = np.random.default_rng(num_shards * 1_000_003 + num_queries * 101 + k)
    distances = np.sort(rng.random((num_shards, num_queries, k), dtype=np.float32), axis=2)
    ids = rng.integers(0, 2**40, (num_shards, num_queries, k), dtype=np.int64)
    return distances, ids


def _topk_of_concatenation(distances: torch.Tensor, ids: torch.Tensor, k: int):
    num_shards, num_queries, width = distances.shape
    flat_distances = distances.permute(1, 0, 2).reshape(num_queries, num_shards * width)
    flat_ids = ids.permute(1, 0, 2).reshape(num_queries, num_shards * width)
    values, positions = torch.topk(flat_distances, k, dim=1, largest=False, sorted=True)
    return values, flat_ids.gather(1, positions)


def _record_candidate_rate(benchmark, candidates: int) -> None:
    info = benchmark.extra_info
    info["candidates"] = candidates
    if info.get("time_s"):
        info["candidates_per_s"] = candidates / info["time_s"]


def _case_id(case):
    return f"S{case[0]}-Q{case[1]}-k{case[2]}"


@pytest.mark.parametrize("impl", ("cuda", "torch_topk"))
@pytest.mark.parametrize("case", GPU_CASES, ids=[_case_id(c) for c in GPU_CASES])
def test_topk_merge_gpu(benchmark, impl, case):
    if not HAS_CUDA:
        pytest.skip(GPU_ONLY_SKIP if GPU_ONLY else "the CUDA merge runs on CUDA only")
    num_shards, num_queries, k = case
    candidates = num_shards * num_queries * k
    distances, ids = shard_results(num_shards, num_queries, k)
    distances_t, ids_t = torch.from_numpy(distances).cuda(), torch.from_numpy(ids).cuda()
    if impl == "cuda":
        fn = lambda: topk_merge(distances_t, ids_t, k, backend="compiled")  # noqa: E731
        # The warp merge reads every distance once, the ids of about k + S candidates, and writes k results
        # (docs/topk_merge_gpu.md).
        bytes_moved = num_queries * (candidates // num_queries * 4 + (k + num_shards) * 8 + k * CANDIDATE_BYTES)
    else:
        fn = lambda: _topk_of_concatenation(distances_t, ids_t, k)  # noqa: E731
        bytes_moved = (candidates + num_queries * k) * CANDIDATE_BYTES
    run_case(benchmark, fn, op="topk_merge", impl=impl, shape=f"S={num_shards},Q={num_queries},k={k}",
             dtype=torch.float32, device="cuda", bytes=bytes_moved, size=candidates, baseline="torch_topk")
    _record_candidate_rate(benchmark, candidates)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_topk_merge_cpu(benchmark, impl, case):
    if GPU_ONLY:
        pytest.skip("KARMA_BENCH_GPU_ONLY=1: the CPU merge cases are not run (docs/bench_cpu.md has them)")
    num_shards, num_queries, k = case
    candidates = num_shards * num_queries * k
    distances, ids = shard_results(num_shards, num_queries, k)
    merged_bytes = num_queries * (k + num_shards + k) * CANDIDATE_BYTES  # read ~k+S, write k
    full_bytes = (candidates + num_queries * k) * CANDIDATE_BYTES
    if impl == "cpp":
        fn, bytes_moved = (lambda: topk_merge(distances, ids, k)), merged_bytes
    elif impl == "cpp_select":
        fn, bytes_moved = (lambda: topk_merge(distances, ids, k, sorted=False)), full_bytes
    elif impl == "faiss":
        faiss = pytest.importorskip("faiss", reason="faiss is not installed (pip install faiss-cpu)")
        fn, bytes_moved = (lambda: faiss.merge_knn_results(distances, ids, keep_max=False)), merged_bytes
    elif impl == "torch_topk":
        distances_t, ids_t = torch.from_numpy(distances), torch.from_numpy(ids)
        fn, bytes_moved = (lambda: _topk_of_concatenation(distances_t, ids_t, k)), full_bytes
    else:
        if candidates > REFERENCE_MAX_CANDIDATES:
            pytest.skip(f"the reference sorts every candidate: only up to {REFERENCE_MAX_CANDIDATES} here")
        fn, bytes_moved = (lambda: topk_merge_reference(list(distances), list(ids), k)), full_bytes
    rounds = {} if impl == "reference" else dict(rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    run_case(benchmark, fn, op="topk_merge", impl=impl, shape=f"S={num_shards},Q={num_queries},k={k}",
             dtype=torch.float32, device="cpu", bytes=bytes_moved, size=candidates, **rounds)
    _record_candidate_rate(benchmark, candidates)
