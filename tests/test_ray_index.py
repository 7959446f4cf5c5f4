"""RayShardedIndex on a local Ray cluster: same answers as ShardedIndex and one exact index; failures are loud."""
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
faiss = pytest.importorskip("faiss")

from karma.ray_index import RayShardedIndex  # noqa: E402
from karma.retrieval import ShardedIndex  # noqa: E402

D_SMALL = 16


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _data(n, q, d=D_SMALL, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((q, d)).astype(np.float32)


def _exact(vectors, queries, k, metric):
    flat = faiss.IndexFlatL2(vectors.shape[1]) if metric == "l2" else faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, k)


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _assert_same(got, want, *, exact_distances):
    got_d, got_i = _np(got[0]), _np(got[1])
    want_d, want_i = _np(want[0]), _np(want[1])
    np.testing.assert_array_equal(got_i, want_i)
    finite = want_i >= 0
    if exact_distances:
        np.testing.assert_array_equal(got_d[finite], want_d[finite])
    else:  # the unsharded index sums its BLAS products in another order
        np.testing.assert_allclose(got_d[finite], want_d[finite], rtol=1e-5, atol=1e-5)


def test_same_results_as_sharded_index_and_exact_index():
    vectors, queries = _data(1003, 37)
    k = 10
    with RayShardedIndex.build(vectors, 3, metric="l2") as index:
        assert index.ntotal == 1003 and index.num_shards == 3
        got = index.search(queries, k)
        threads = ShardedIndex.build(vectors, 3, metric="l2", device="cpu")  # the same CPU faiss arithmetic
        _assert_same(got, threads.search(queries, k), exact_distances=True)
        _assert_same(got, _exact(vectors, queries, k, "l2"), exact_distances=False)
        # torch queries are taken too; k larger than the whole index pads with -1, as faiss does
        got_all = index.search(torch.from_numpy(queries[:5]), 1010)
        assert (_np(got_all[1])[:, 1003:] == -1).all()
        _assert_same(got_all, _exact(vectors, queries[:5], 1010, "l2"), exact_distances=False)
        # bad inputs
        with pytest.raises(ValueError, match="16 columns"):
            index.search(queries[:, :8], 3)
        with pytest.raises(ValueError, match="k must be"):
            index.search(queries, 0)
        with pytest.raises(ValueError, match="2-D"):
            index.search(queries[0], 3)


def test_prebuilt_replicated_shards_hedged_with_id_offsets():
    vectors, queries = _data(600, 25, seed=1)
    k = 9
    parts = [vectors[:250], vectors[250:]]
    shards = []
    for part in parts:
        shard = faiss.IndexFlatIP(D_SMALL)
        shard.add(part)
        shards.append(shard)
    # the caller's global ids: shard s holds ids 10_000 * s + local id
    offsets = [0, 10_000]
    with RayShardedIndex(shards, metric="ip", id_offsets=offsets, replicas=2, hedge=True) as index:
        assert index.ntotal == 600 and index.num_shards == 2
        got_d, got_i = index.search(queries, k)
        assert set(index.last_timing) == {"total_s", "fanout_s", "merge_s"}
    # hedging merges the replies of both replicas of a shard: each id must still come back once
    assert all(len(set(row)) == len(row) for row in got_i.tolist()), "a replicated id came back twice"
    want_d, want_i = _exact(vectors, queries, k, "ip")
    np.testing.assert_array_equal(got_i, np.where(want_i < 250, want_i, want_i - 250 + 10_000))
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    vectors, _ = _data(100, 4, seed=5)
    with pytest.raises(ValueError, match="metric"):
        RayShardedIndex.build(vectors, 2, metric="cosine")
    with pytest.raises(ValueError, match="num_shards"):
        RayShardedIndex.build(vectors, 0)
    with pytest.raises(ValueError, match="replicas"):
        RayShardedIndex.build(vectors, 2, replicas=0)
    with pytest.raises(TypeError, match="faiss indexes"):
        RayShardedIndex([vectors])


def _heavy(seed):
    # Big enough that one shard's search takes ~0.5 s on one thread, so a kill sent right after the
    # search is submitted lands while the query is in flight (the kill takes milliseconds).
    return _data(2 * 30000, 2048, d=64, seed=seed)


def test_killed_actor_is_retried_on_a_replica_then_fails_loudly():
    vectors, queries = _heavy(4)
    want = _exact(vectors, queries, 5, "l2")
    with RayShardedIndex.build(vectors, 2, replicas=2, omp_threads=1) as index:
        # 0. replies slower than timeout_s: every replica of the shard is tried, then a clear error
        index.timeout_s = 0.01
        with pytest.raises(RuntimeError, match=r"shard 0 \(actor .* gave no reply within 0.01 s"):
            index.search(queries, 5)
        index.timeout_s = None
        # 1. the replica serving shard 0 dies mid-query: the query is retried on the other replica
        pending = index.search_async(queries, 5)
        victim = pending.actors[0]
        ray.kill(victim, no_restart=True)
        _assert_same(pending.result(), want, exact_distances=False)
        assert index._dead == [[victim == actor for actor in group] for group in index.shard_actors], \
            "the killed replica should be marked dead, and only it"
        # 2. the last replica of shard 0 dies mid-query: a clear error naming the shard, not shard 1 alone
        pending = index.search_async(queries, 5)
        survivor = pending.actors[0]
        assert survivor != victim
        ray.kill(survivor, no_restart=True)
        with pytest.raises(RuntimeError, match=r"shard 0 \(actor [0-9a-f, ]+\) failed: .*ActorDiedError"):
            pending.result()
        # 3. and so does every later search
        with pytest.raises(RuntimeError, match=r"shard 0 \(actor"):
            index.search(queries[:3], 5)
    with pytest.raises(RuntimeError, match=r"shard 0 \(actor"):
        index.search(queries[:3], 5)  # shut down by the with-block: every actor is gone
