"""ShardedIndex: sharded faiss search merged by topk_merge equals one unsharded exact index."""
import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from karma.retrieval import ShardedIndex  # noqa: E402


def exact_search(vectors, queries, k, metric):
    index = faiss.IndexFlatL2(vectors.shape[1]) if metric == "l2" else faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index.search(queries, k)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1003, 24)).astype(np.float32)
    queries = rng.standard_normal((57, 24)).astype(np.float32)
    return vectors, queries


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("num_shards", [1, 3, 8])
def test_flat_shards_equal_one_exact_index(data, metric, num_shards):
    vectors, queries = data
    index = ShardedIndex.build(vectors, num_shards, metric=metric)
    assert index.ntotal == len(vectors) and len(index.shards) == num_shards
    for k in (1, 10, 100):
        distances, ids = index.search(queries, k)
        want_distances, want_ids = exact_search(vectors, queries, k, metric)
        assert distances.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (len(queries), k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(distances, want_distances)  # same per-pair arithmetic as unsharded
    index.close()


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ivf_with_every_list_probed_is_exact(data, metric):
    vectors, queries = data
    nlist = 4
    index = ShardedIndex.build(vectors, 3, metric=metric, factory=f"IVF{nlist},Flat")
    for shard in index.shards:
        faiss.extract_index_ivf(shard).nprobe = nlist
    distances, ids = index.search(queries, 20)
    want_distances, want_ids = exact_search(vectors, queries, 20, metric)
    np.testing.assert_array_equal(ids, want_ids)
    # IVF computes each distance without BLAS, the flat index with it: equal up to float rounding.
    np.testing.assert_allclose(distances, want_distances, rtol=1e-5, atol=1e-5)


def test_k_beyond_the_items_pads_with_minus_one_and_inf(data):
    vectors, queries = data
    index = ShardedIndex.build(vectors[:7], 3, metric="l2")  # shards of 3, 2, 2 items
    distances, ids = index.search(queries[:4], 10)
    assert (ids[:, 7:] == -1).all() and np.isinf(distances[:, 7:]).all() and (distances[:, 7:] > 0).all()
    assert sorted(ids[0, :7].tolist()) == list(range(7))
    want_distances, want_ids = exact_search(vectors[:7], queries[:4], 7, "l2")
    np.testing.assert_array_equal(ids[:, :7], want_ids)


def test_explicit_id_offsets_and_an_empty_shard(data):
    vectors, queries = data
    full = faiss.IndexFlatL2(24)
    full.add(vectors[:500])
    empty = faiss.IndexFlatL2(24)
    rest = faiss.IndexFlatL2(24)
    rest.add(vectors[500:])
    index = ShardedIndex([full, empty, rest], metric="l2", id_offsets=[0, 500, 500], max_workers=2)
    assert index.id_offsets == [0, 500, 500]
    ids = index.search(queries, 5)[1]
    np.testing.assert_array_equal(ids, exact_search(vectors, queries, 5, "l2")[1])
    default = ShardedIndex([full, empty, rest], metric="l2")
    assert default.id_offsets == [0, 500, 500]


def test_bad_inputs_raise_clear_errors(data):
    vectors, queries = data
    with pytest.raises(ValueError, match="metric must be one of"):
        ShardedIndex.build(vectors, 2, metric="cosine")
    with pytest.raises(ValueError, match="num_shards must be an int >= 1"):
        ShardedIndex.build(vectors, 0)
    with pytest.raises(ValueError, match="exceeds the number of vectors"):
        ShardedIndex.build(vectors[:3], 4)
    with pytest.raises(ValueError, match="vectors must be a non-empty 2-D"):
        ShardedIndex.build(vectors[0], 2)
    with pytest.raises(ValueError, match="shards must be a non-empty list"):
        ShardedIndex([])
    with pytest.raises(TypeError, match=r"shards\[0\] must be a faiss.Index"):
        ShardedIndex(["not an index"])
    with pytest.raises(ValueError, match=r"shards\[0\] uses faiss metric"):
        ShardedIndex([faiss.IndexFlatIP(4)], metric="l2")
    with pytest.raises(ValueError, match=r"shards\[1\] has dimension 8"):
        ShardedIndex([faiss.IndexFlatL2(4), faiss.IndexFlatL2(8)])
    with pytest.raises(ValueError, match="id_offsets must have one entry per shard"):
        ShardedIndex([faiss.IndexFlatL2(4)], id_offsets=[0, 1])
    index = ShardedIndex.build(vectors, 2)
    with pytest.raises(ValueError, match=r"queries must be 2-D \(Q, 24\)"):
        index.search(queries[:, :5], 3)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        index.search(queries, 0)
    with pytest.raises(TypeError, match="queries must be floating"):
        index.search(queries.astype(np.int64), 3)
