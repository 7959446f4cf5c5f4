"""ShardedIndex: sharded faiss search merged by topk_merge equals one unsharded exact index; the cpu / cuda path
rule; the cuda path gives the cpu path's results (gpu tests)."""
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from karma.retrieval import (GpuFacts, ShardedIndex, gpu_facts, gpu_unavailable_reasons,  # noqa: E402
                             why_not_gpu)


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


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_k_beyond_the_items_pads_like_faiss(data, metric):
    vectors, queries = data
    index = ShardedIndex.build(vectors[:7], 3, metric=metric)  # shards of 3, 2, 2 items
    distances, ids = index.search(queries[:4], 10)
    flt_max = np.finfo(np.float32).max
    assert (ids[:, 7:] == -1).all() and (distances[:, 7:] == (flt_max if metric == "l2" else -flt_max)).all()
    assert sorted(ids[0, :7].tolist()) == list(range(7))
    want_distances, want_ids = exact_search(vectors[:7], queries[:4], 10, metric)  # faiss pads with +-FLT_MAX
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(distances, want_distances)
    tensor_distances, tensor_ids = index.search(torch.from_numpy(queries[:4]), 10)  # the torch layout too
    np.testing.assert_array_equal(tensor_distances.numpy(), want_distances)


def kth_tie_groups(distances, full_scores, k_th):
    """Per row: True when an item left out of the top k has the row's k-th distance (a tie faiss decides)."""
    return [(full_scores[row] == k_th[row]).sum() > (distances[row] == k_th[row]).sum()
            for row in range(len(distances))]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("num_queries", [5, 40])  # faiss's sequential and BLAS search paths (threshold 20)
def test_ties_are_ordered_like_one_exact_faiss_index(metric, num_queries):
    """Integer data: exact distances and many ties. L2: equal to IndexFlatL2 in everything. IP: equal to
    IndexFlatIP (descending ids inside a tie) except which items tied at the k-th distance are kept."""
    vectors, queries = integer_data(300, num_queries, dim=4, seed=3)
    vectors[::7] = 0  # zero vectors: whole groups tied at distance |q|^2 / 0
    index = ShardedIndex.build(vectors, 4, metric=metric)
    exact = vectors.astype(np.float64)
    full = (((exact[None] - queries[:, None].astype(np.float64)) ** 2).sum(-1) if metric == "l2"
            else queries.astype(np.float64) @ exact.T)
    boundary_ties = 0
    for k in (1, 7, 50, 301):
        distances, ids = index.search(queries, k)
        want_distances, want_ids = exact_search(vectors, queries, k, metric)
        np.testing.assert_array_equal(distances, want_distances)
        if metric == "l2":
            np.testing.assert_array_equal(ids, want_ids)
            continue
        k_th = distances[:, -1]
        undecided = kth_tie_groups(distances, full, k_th)
        boundary_ties += sum(undecided)
        for row in range(num_queries):
            if not undecided[row]:
                np.testing.assert_array_equal(ids[row], want_ids[row])
                continue
            decided = distances[row] > k_th[row]
            np.testing.assert_array_equal(ids[row][decided], want_ids[row][decided])
            kept = ids[row][~decided]  # items at the k-th distance, in descending id order like faiss's
            group = np.flatnonzero(full[row] == k_th[row])
            assert set(kept.tolist()) <= set(group.tolist()) and (np.diff(kept) < 0).all(), (row, kept, group)
    if metric == "ip":
        assert boundary_ties > 0  # the data exercises the one documented difference


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


# --- the choice of search path (cpu / cuda) and the cuda path -----------------------------------------------

GOOD_FACTS = GpuFacts(faiss_has_gpu=True, faiss_num_gpus=1, torch_cuda=True, merge_has_cuda=True,
                      shard_types=("IndexFlat", "IndexFlatIP"))


def test_gpu_rule_takes_the_cuda_path_only_when_every_fact_holds():
    assert gpu_unavailable_reasons(GOOD_FACTS) == []
    assert gpu_unavailable_reasons(replace(GOOD_FACTS, shard_types=("GpuIndexFlatL2", "IndexFlatL2"))) == []
    single = [(dict(faiss_has_gpu=False, faiss_num_gpus=0), "faiss was built without GPU support (faiss-cpu)"),
              (dict(faiss_num_gpus=0), "faiss sees no GPU"),
              (dict(torch_cuda=False), "torch has no CUDA device"),
              (dict(merge_has_cuda=False), "no CUDA topk_merge kernel"),
              (dict(shard_types=("IndexFlat", "IndexIVFFlat", "IndexHNSWFlat", "IndexIVFFlat")),
               "Flat indexes only, got IndexHNSWFlat, IndexIVFFlat")]
    for change, message in single:
        reasons = gpu_unavailable_reasons(replace(GOOD_FACTS, **change))
        assert len(reasons) == 1 and message in reasons[0], (change, reasons)
    everything = gpu_unavailable_reasons(GpuFacts(False, 0, False, False, ("IndexPQ",)))
    assert [r.split(" ")[0] for r in everything] == ["faiss", "torch", "karma_kernels._C", "the"]


def test_why_not_gpu_reads_this_machine():
    shards = [faiss.IndexFlatL2(4), faiss.index_factory(4, "IVF2,Flat")]
    facts = gpu_facts(shards)
    assert facts.shard_types == ("IndexFlatL2", "IndexIVFFlat")
    assert facts.torch_cuda == torch.cuda.is_available()
    assert facts.faiss_has_gpu == hasattr(faiss, "StandardGpuResources")
    if not facts.faiss_has_gpu:
        assert facts.faiss_num_gpus == 0
    reason = why_not_gpu(shards)
    assert reason == "; ".join(gpu_unavailable_reasons(facts)) and "IndexIVFFlat" in reason
    assert why_not_gpu() == ("; ".join(gpu_unavailable_reasons(gpu_facts())) or None)


def test_non_flat_shards_stay_on_the_cpu_path_with_the_reason(data):
    vectors, queries = data
    index = ShardedIndex.build(vectors, 2, factory="IVF4,Flat", device="auto")
    assert index.device == "cpu" and index.shard_devices == []
    assert "Flat indexes only, got IndexIVFFlat" in index.why_not_gpu
    with pytest.raises(ValueError, match="device='cuda' but the cuda path cannot run: .*IndexIVFFlat"):
        ShardedIndex.build(vectors, 2, factory="IVF4,Flat", device="cuda")


def test_auto_without_a_usable_gpu_takes_the_cpu_path(data):
    vectors, queries = data
    reason = why_not_gpu()
    if reason is None:
        pytest.skip("this machine runs the cuda path (see the gpu tests)")
    index = ShardedIndex.build(vectors, 3, device="auto")
    assert index.device == "cpu" and index.why_not_gpu == reason
    np.testing.assert_array_equal(index.search(queries, 10)[1], exact_search(vectors, queries, 10, "l2")[1])
    with pytest.raises(ValueError, match="device='cuda' but the cuda path cannot run: " + re.escape(reason)):
        ShardedIndex.build(vectors, 3, device="cuda")
    assert ShardedIndex.build(vectors, 3, device="cpu").why_not_gpu == "device='cpu' was requested"


def test_torch_queries_get_torch_results(data):
    vectors, queries = data
    index = ShardedIndex.build(vectors, 3, metric="ip", device="cpu")
    want_distances, want_ids = index.search(queries, 10)
    for dtype in (torch.float32, torch.float64):
        distances, ids = index.search(torch.from_numpy(queries).to(dtype), 10)
        assert isinstance(distances, torch.Tensor) and distances.dtype == torch.float32 and ids.dtype == torch.int64
        np.testing.assert_array_equal(distances.numpy(), want_distances)
        np.testing.assert_array_equal(ids.numpy(), want_ids)
    with pytest.raises(TypeError, match="queries must be floating"):
        index.search(torch.ones(2, 24, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"queries must be 2-D \(Q, 24\)"):
        index.search(torch.ones(24), 3)
    with pytest.raises(ValueError, match="device must be one of"):
        ShardedIndex.build(vectors, 2, device="tpu")
    from_tensor = ShardedIndex.build(torch.from_numpy(vectors).to(torch.float64), 3, metric="ip", device="cpu")
    np.testing.assert_array_equal(from_tensor.search(queries, 10)[1], want_ids)
    with pytest.raises(TypeError, match="vectors must be floating"):
        ShardedIndex.build(torch.ones(5, 2, dtype=torch.int32), 2)


def require_cuda_path():
    reason = why_not_gpu()
    if reason is not None:
        pytest.skip(f"the cuda path cannot run here: {reason}")


def integer_data(num_items, num_queries, dim=8, seed=1):
    # Small integers: every distance is exact in fp32 (also under TF32) on both paths, and ties are frequent.
    rng = np.random.default_rng(seed)
    return (rng.integers(-3, 4, (num_items, dim)).astype(np.float32),
            rng.integers(-3, 4, (num_queries, dim)).astype(np.float32))


def assert_same_up_to_boundary_ties(vectors, queries, distances, ids, want_distances, want_ids, metric):
    """Equal distances; equal ids wherever the distance is strictly better than the row's k-th (those items are
    determined); at the k-th distance, any real items at that distance, in faiss's order (ascending id for l2,
    descending for ip), padding last."""
    np.testing.assert_array_equal(distances, want_distances)
    kth = distances[:, -1:]
    determined = distances < kth if metric == "l2" else distances > kth
    np.testing.assert_array_equal(np.where(determined, ids, 0), np.where(determined, want_ids, 0))
    exact = vectors.astype(np.float64)
    for row in range(len(queries)):
        tied = ids[row][~determined[row]]
        real = tied[tied >= 0]
        step = np.diff(real) if metric == "l2" else -np.diff(real)
        assert (step > 0).all() and (tied[len(real):] == -1).all(), (row, tied)
        query = queries[row].astype(np.float64)
        true = ((exact[real] - query) ** 2).sum(1) if metric == "l2" else exact[real] @ query
        np.testing.assert_array_equal(true.astype(np.float32), distances[row][~determined[row]][:len(real)])
        assert len(np.unique(ids[row][ids[row] >= 0])) == (ids[row] >= 0).sum()


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("num_shards", [1, 3, 8])
def test_cuda_path_equals_the_cpu_path(metric, num_shards):
    require_cuda_path()
    vectors, queries = integer_data(3001, 200)
    cpu = ShardedIndex.build(vectors, num_shards, metric=metric, device="cpu")
    # all shards on one device, built from a CUDA tensor
    gpu = ShardedIndex.build(torch.from_numpy(vectors).cuda(), num_shards, metric=metric, device="cuda", gpus=[0])
    assert gpu.device == "cuda" and gpu.why_not_gpu is None and gpu.shard_devices == [0] * num_shards
    on_device = torch.from_numpy(queries).cuda()
    for k in (1, 10, 100):
        distances, ids = gpu.search(on_device, k)
        assert distances.device == on_device.device and ids.device == on_device.device
        assert distances.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (len(queries), k)
        assert_same_up_to_boundary_ties(vectors, queries, distances.cpu().numpy(), ids.cpu().numpy(),
                                        *cpu.search(queries, k), metric)
        numpy_distances, numpy_ids = gpu.search(queries, k)  # numpy in, numpy out
        np.testing.assert_array_equal(numpy_ids, ids.cpu().numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_cuda_path_pads_and_offsets_like_the_cpu_path(metric):
    require_cuda_path()
    vectors, queries = integer_data(7, 5)
    for build in (dict(num_shards=3), dict(num_shards=7)):
        want = ShardedIndex.build(vectors, metric=metric, device="cpu", **build).search(queries, 10)
        got = ShardedIndex.build(vectors, metric=metric, device="cuda", **build).search(queries, 10)
        assert_same_up_to_boundary_ties(vectors, queries, *got, *want, metric)
        flt_max = np.finfo(np.float32).max
        assert (got[1][:, 7:] == -1).all() and (np.abs(got[0][:, 7:]) == flt_max).all()
    vectors, queries = integer_data(900, 50, seed=2)
    flat = faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP
    full, empty, rest = flat(8), flat(8), flat(8)
    full.add(vectors[:500])
    rest.add(vectors[500:])
    options = dict(metric=metric, id_offsets=[0, 500, 500])
    got = ShardedIndex([full, empty, rest], device="cuda", **options).search(queries, 20)
    want = ShardedIndex([full, empty, rest], device="cpu", **options).search(queries, 20)
    assert_same_up_to_boundary_ties(vectors, queries, *got, *want, metric)


@pytest.mark.gpu
def test_cuda_search_stays_on_the_device_without_a_host_sync():
    require_cuda_path()
    vectors, _ = integer_data(4000, 1, dim=16)
    index = ShardedIndex.build(vectors, 8, device="cuda", gpus=[0])
    queries = torch.randn(64, 16, device="cuda")
    index.search(queries, 10)  # warm-up
    torch.cuda.set_sync_debug_mode("error")  # any synchronising torch call in the search raises
    try:
        distances, ids = index.search(queries, 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert distances.is_cuda and ids.is_cuda and ids.shape == (64, 10)


@pytest.mark.gpu
def test_cuda_path_bad_arguments():
    require_cuda_path()
    vectors, queries = integer_data(100, 3)
    with pytest.raises(ValueError, match="gpus must be a non-empty list of device ordinals"):
        ShardedIndex.build(vectors, 2, device="cuda", gpus=[faiss.get_num_gpus()])
    with pytest.raises(ValueError, match="gpus must be a non-empty list of device ordinals"):
        ShardedIndex.build(vectors, 2, device="cuda", gpus=[])
    index = ShardedIndex.build(vectors, 2, device="cuda")
    with pytest.raises(ValueError, match="exceeds faiss GPU's k-selection limit 2048"):
        index.search(queries, 2049)
    gpu_shard = index.shards[0]
    with pytest.raises(ValueError, match="device='cpu' but the shards are faiss GPU indexes"):
        ShardedIndex([gpu_shard], device="cpu")
    with pytest.raises(ValueError, match="shards mix faiss CPU and GPU indexes"):
        ShardedIndex([gpu_shard, faiss.IndexFlatL2(8)])
    with pytest.raises(ValueError, match=r"id_offsets\[0\] = -1"):
        ShardedIndex([faiss.IndexFlatL2(8)], id_offsets=[-1], device="cuda")


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_layout_is_the_same_on_tensors_and_arrays(metric):
    """The cuda path lays out tensors with torch ops: the same result as the numpy layout (run here on CPU)."""
    from karma.retrieval import faiss_layout
    rng = np.random.default_rng(4)
    distances = np.sort(rng.integers(-2, 3, (30, 9)).astype(np.float32), axis=1)
    distances = distances[:, ::-1].copy() if metric == "ip" else distances
    ids = np.sort(rng.integers(0, 50, (30, 9)), axis=1)
    ids[:, -2:] = -1
    distances[:, -2:] = np.inf if metric == "l2" else -np.inf
    distances[3, 1] = np.nan
    want = faiss_layout(distances, ids, metric)
    got = faiss_layout(torch.from_numpy(distances), torch.from_numpy(ids), metric)
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_array_equal(got[1].numpy(), want[1])
    if metric == "ip":
        assert (want[1] != ids).any()  # some ties were reordered
