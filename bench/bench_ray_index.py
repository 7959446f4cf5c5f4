"""Sharded search fan-out: Ray actors (one per shard) vs in-process threads (ShardedIndex) vs one faiss index.

Records queries/s and the latency of one search call for S = 2 and 4 shards, and the share of the call spent in
the top-k merge (``merge_share``): for Ray it is read from the index's own timing of each call; for threads it is
a ``topk_merge`` of the same shard results timed on its own, divided by the call's median time.

faiss runs one OpenMP thread per shard everywhere (in the driver and in each actor), so the parallelism
measured is the fan-out's own, and busy machines do not turn OpenMP barriers into spin-waits; the unsharded
baseline ("faiss") is one index on one thread.

Peak memory is the driver process's RSS growth (bench/_mem.py): Ray actors live in other processes, so their
memory is not in it (``mem_note``). Run: ``pytest bench/bench_ray_index.py --benchmark-only``; quick:
``KARMA_BENCH_QUICK=1``.
"""
import statistics
import time

import numpy as np
import pytest

from bench.conftest import QUICK, run_case

faiss = pytest.importorskip("faiss")

if QUICK:
    N, DIM, NUM_QUERIES, K, ROUNDS = 20_000, 32, 256, 10, 3
else:
    N, DIM, NUM_QUERIES, K, ROUNDS = 200_000, 64, 1_000, 100, 5
SHARD_COUNTS = (2, 4)
BATCHES = (1, NUM_QUERIES)  # one query: latency; a batch: throughput


@pytest.fixture(scope="module", autouse=True)
def one_omp_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((N, DIM)).astype(np.float32),
            rng.standard_normal((NUM_QUERIES, DIM)).astype(np.float32))


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_indexes(data, ray_cluster):
    """One RayShardedIndex per shard count, shared by the batch sizes (actors take seconds to start)."""
    from karma.ray_index import RayShardedIndex

    vectors, _ = data
    indexes = {}

    def index_with(num_shards):
        if num_shards not in indexes:
            indexes[num_shards] = RayShardedIndex.build(vectors, num_shards, metric="l2", omp_threads=1)
        return indexes[num_shards]

    yield index_with
    for index in indexes.values():
        index.shutdown()


def _shape(num_shards, batch):
    return f"N={N},D={DIM},Q={batch},k={K},S={num_shards}"


def _record(benchmark, batch, merge_share, **extra):
    info = benchmark.extra_info
    # ratios in the report: Ray fan-out against in-process threads at the same shard count and batch
    info["baseline"] = "threads"
    time_s = info.get("time_s")
    if time_s:
        info["queries_per_s"] = batch / time_s
        info["latency_s"] = time_s
    if merge_share is not None:
        info["merge_share"] = merge_share
    info.update(extra)


@pytest.mark.parametrize("batch", BATCHES)
def test_unsharded_faiss(benchmark, data, batch):
    vectors, queries = data
    index = faiss.IndexFlatL2(DIM)
    index.add(vectors)
    run_case(benchmark, lambda: index.search(queries[:batch], K), op="sharded_search", impl="faiss",
             shape=_shape(1, batch), size=N * batch, dtype="float32", device="cpu", rounds=ROUNDS,
             warmup_rounds=1)
    _record(benchmark, batch, None, num_shards=1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_shards", SHARD_COUNTS)
def test_threads(benchmark, data, num_shards, batch):
    retrieval = pytest.importorskip("karma.retrieval", reason="karma.retrieval (ShardedIndex) is not available")
    from karma_kernels import topk_merge

    vectors, queries = data
    index = retrieval.ShardedIndex.build(vectors, num_shards, metric="l2", device="cpu")
    run_case(benchmark, lambda: index.search(queries[:batch], K), op="sharded_search", impl="threads",
             shape=_shape(num_shards, batch), size=N * batch, dtype="float32", device="cpu", rounds=ROUNDS,
             warmup_rounds=1)
    # the merge on its own, on the same shard results
    parts = np.array_split(vectors, num_shards)
    replies, offsets, start = [], [], 0
    for part in parts:
        shard = faiss.IndexFlatL2(DIM)
        shard.add(part)
        replies.append(shard.search(queries[:batch], K))
        offsets.append(start)
        start += len(part)
    merge_times = []
    for _ in range(ROUNDS):
        began = time.perf_counter()
        topk_merge([d for d, _ in replies], [i for _, i in replies], K, metric="l2", id_offsets=offsets)
        merge_times.append(time.perf_counter() - began)
    time_s = benchmark.extra_info.get("time_s")
    share = statistics.median(merge_times) / time_s if time_s else None
    _record(benchmark, batch, share, num_shards=num_shards, merge_s=statistics.median(merge_times))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_shards", SHARD_COUNTS)
def test_ray(benchmark, data, ray_indexes, num_shards, batch):
    _, queries = data
    index = ray_indexes(num_shards)
    timings = []

    def search():
        result = index.search(queries[:batch], K)
        timings.append(dict(index.last_timing))
        return result

    run_case(benchmark, search, op="sharded_search", impl="ray", shape=_shape(num_shards, batch),
             size=N * batch, dtype="float32", device="cpu", rounds=ROUNDS, warmup_rounds=1,
             mem_note="driver process only; each actor holds its shard in its own process")
    measured = timings[-ROUNDS:]
    share = statistics.median(t["merge_s"] / t["total_s"] for t in measured)
    _record(benchmark, batch, share, num_shards=num_shards,
            merge_s=statistics.median(t["merge_s"] for t in measured),
            fanout_s=statistics.median(t["fanout_s"] for t in measured))
