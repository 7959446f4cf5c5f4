"""topk_merge: the compiled op against the numpy reference (and faiss where their semantics agree)."""
import functools
import os

import numpy as np
import pytest
import torch

from karma_kernels import topk_merge
from karma_kernels.topk_merge import topk_merge_reference
from karma_kernels.topk_merge.op import _extension_loaded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


# Every parity test runs against the compiled CPU op and against the host build of the CUDA kernel's warp
# algorithm (csrc/topk_merge_warp.h, 32 lanes in lockstep): the GPU algorithm's semantics are tested here.
BACKENDS = {"cpu": "auto", "warp": "device_emulation"}


@pytest.fixture(params=list(BACKENDS))
def merge(request):
    return functools.partial(topk_merge, backend=BACKENDS[request.param])


def is_warp(merge):
    return merge.keywords["backend"] == "device_emulation"


@pytest.fixture(scope="module", autouse=True)
def compiled_extension():
    if not _extension_loaded():
        pytest.fail("karma_kernels._C is not built: run `pip install --no-build-isolation -e .`")


def make_shards(rng, num_shards, num_queries, widths, *, metric="l2", sorted_rows=True, tie_levels=None,
                nan_rate=0.0, padding_rate=0.0, id_range=None, dtype=np.float32):
    """Per-shard (Q, k_s) rows like a search returns: sorted best-first by distance only (ties in any id
    order), NaN last, padding (id -1, with a random distance that must never matter) anywhere."""
    distances, ids = [], []
    for s in range(num_shards):
        width = widths[s] if isinstance(widths, (list, tuple)) else widths
        if tie_levels:
            values = rng.integers(0, tie_levels, (num_queries, width)).astype(np.float64)
        else:
            values = rng.standard_normal((num_queries, width))
        values[rng.random(values.shape) < nan_rate] = np.nan
        if sorted_rows:
            key = -values if metric == "ip" else values
            values = np.take_along_axis(values, np.argsort(key, axis=1, kind="stable"), axis=1)  # NaN last
        high = id_range if id_range is not None else 1000 * num_shards
        row_ids = rng.integers(0, high, (num_queries, width))
        if id_range is None:  # distinct ids within a query: row r of shard s owns [1000 s, 1000 s + 1000)
            row_ids = np.stack([rng.permutation(1000)[:width] + 1000 * s for _ in range(num_queries)]) \
                if width else np.zeros((num_queries, 0), dtype=np.int64)
        pad = rng.random((num_queries, width)) < padding_rate
        row_ids = np.where(pad, -1, row_ids).astype(np.int64)
        values = np.where(pad, rng.standard_normal(values.shape) * 100, values)
        distances.append(values.astype(dtype))
        ids.append(row_ids)
    return distances, ids


def expect(distances, ids, k, **options):
    metric = options.pop("metric", "l2")
    options.pop("sorted", None)
    return topk_merge_reference([np.asarray(d, dtype=np.float64) for d in distances], ids, k,
                                largest=metric == "ip", **options)


def assert_same(result, truth):
    out_distances, out_ids = (np.asarray(x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16
                                         else x) for x in result)
    np.testing.assert_array_equal(out_ids, truth[1])
    # Values are selected, never computed: equal to the reference exactly (NaN in the same places).
    np.testing.assert_array_equal(out_distances.astype(np.float64), truth[0])


CASES = [  # num_shards, num_queries, widths, k
    (1, 1, 1, 1),
    (1, 5, 7, 3),
    (3, 17, 5, 4),
    (4, 33, [8, 0, 3, 12], 50),
    (7, 6, 13, 13),
    (16, 9, 10, 100),
    (20, 4, [3, 0, 9, 1] * 5, 25),  # loser trees of every depth: 1 (S <= 2) ... 6 (S <= 64) unrolled, 7 a loop
    (37, 5, [7, 0, 3] * 12 + [9], 30),
    (70, 3, [2, 0, 5, 1] * 17 + [3, 3], 40),
    # The sorted merge reads rows in blocks of 15: rows that take several blocks, tie groups across blocks.
    (2, 7, [40, 33], 60),
    (5, 9, [16, 15, 31, 1, 47], 45),
    (3, 11, 64, 5),
]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("sorted_rows", [True, False])
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c[0]}Q{c[1]}w{c[2]}k{c[3]}")
def test_matches_reference_with_ties_nan_and_padding(metric, sorted_rows, dedup, case, merge):
    num_shards, num_queries, widths, k = case
    rng = np.random.default_rng(hash((metric, sorted_rows, dedup, num_shards, k)) % 2**32)
    distances, ids = make_shards(rng, num_shards, num_queries, widths, metric=metric, sorted_rows=sorted_rows,
                                 tie_levels=4, nan_rate=0.1, padding_rate=0.15,
                                 id_range=40 if dedup else None)
    offsets = list(range(0, 7 * num_shards, 7)) if dedup else None
    if is_warp(merge) and num_shards > 64:  # the GPU path's shard table is a kernel parameter of 64 entries
        with pytest.raises(ValueError, match="at most 64 shards per call"):
            merge(distances, ids, k, metric=metric, sorted=sorted_rows, dedup=dedup, id_offsets=offsets)
        return
    result = merge(distances, ids, k, metric=metric, sorted=sorted_rows, dedup=dedup, id_offsets=offsets)
    assert_same(result, expect(distances, ids, k, metric=metric, dedup=dedup, id_offsets=offsets))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dedup", [False, True])
def test_long_padding_runs_and_tie_groups_spanning_read_blocks(dtype, metric, dedup, merge):
    # Whole read blocks of padding (the merge skips them and reads on), and a tie group that starts in one
    # block and ends in a later one, cut by k: its smallest ids must win wherever they sit.
    rng = np.random.default_rng(11)
    num_queries, width = 6, 70
    distances, ids = make_shards(rng, 3, num_queries, width, metric=metric, tie_levels=3,
                                 id_range=60 if dedup else None, dtype=np.dtype(dtype))
    ids[0][:, 2:40] = -1
    ids[2][:, :31] = -1
    for k in (1, 14, 15, 16, 29, 50, 200):
        result = merge(distances, ids, k, metric=metric, dedup=dedup)
        assert_same(result, expect(distances, ids, k, metric=metric, dedup=dedup))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_dtypes_keep_their_exact_values(dtype, metric, merge):
    rng = np.random.default_rng(3)
    distances, ids = make_shards(rng, 5, 21, 9, metric=metric, tie_levels=None, nan_rate=0.05, padding_rate=0.1,
                                 dtype=np.float64)
    # Round through the dtype first, then sort in it: rows stay sorted and ties appear where it rounds.
    tensors = [torch.from_numpy(d).to(TORCH_DTYPES[dtype]) for d in distances]
    keys = [(-t.float() if metric == "ip" else t.float()) for t in tensors]
    orders = [torch.sort(key, dim=1, stable=True).indices for key in keys]
    tensors = [t.gather(1, o) for t, o in zip(tensors, orders)]
    id_tensors = [torch.from_numpy(i).gather(1, o) for i, o in zip(ids, orders)]
    out_distances, out_ids = merge(tensors, id_tensors, 12, metric=metric)
    assert out_distances.dtype == TORCH_DTYPES[dtype] and out_ids.dtype == torch.int64
    truth = expect([t.double().numpy() for t in tensors], [i.numpy() for i in id_tensors], 12, metric=metric)
    assert_same((out_distances, out_ids), truth)


def test_numpy_in_numpy_out_torch_in_torch_out_and_list_equals_stacked(merge):
    rng = np.random.default_rng(4)
    distances, ids = make_shards(rng, 4, 10, 6)
    stacked_d, stacked_i = np.stack(distances), np.stack(ids)
    from_numpy = merge(stacked_d, stacked_i, 5)
    assert all(isinstance(x, np.ndarray) for x in from_numpy)
    assert from_numpy[0].dtype == np.float32 and from_numpy[1].dtype == np.int64
    from_torch = merge(torch.from_numpy(stacked_d), torch.from_numpy(stacked_i), 5)
    assert all(isinstance(x, torch.Tensor) for x in from_torch)
    from_list = merge(distances, ids, 5)
    from_reference = topk_merge(stacked_d, stacked_i, 5, backend="reference")
    for other in (from_torch, from_list, from_reference):
        np.testing.assert_array_equal(np.asarray(other[0]), from_numpy[0])
        np.testing.assert_array_equal(np.asarray(other[1]), from_numpy[1])
    # Non-contiguous rows (a strided view) give the same result.
    wide_d = np.repeat(stacked_d, 2, axis=2)[:, :, ::2]
    wide_i = np.repeat(stacked_i, 2, axis=2)[:, :, ::2]
    strided = merge(wide_d, wide_i, 5)
    np.testing.assert_array_equal(strided[1], from_numpy[1])
    # A stacked array goes to the compiled op whole: any shard and query strides (here queries taken
    # backwards and every other shard of a larger stack), one stacked and one listed input, and offsets.
    big_d, big_i = np.repeat(stacked_d, 2, axis=0), np.repeat(stacked_i, 2, axis=0)
    views = (big_d[::2, ::-1], big_i[::2, ::-1])
    np.testing.assert_array_equal(merge(*views, 5)[1], from_numpy[1][::-1])
    np.testing.assert_array_equal(merge(views[0], list(views[1]), 5)[1], from_numpy[1][::-1])
    offsets = [0, 10**6, 2 * 10**6, 3 * 10**6]
    np.testing.assert_array_equal(merge(stacked_d, stacked_i, 5, id_offsets=offsets)[1],
                                  merge(distances, ids, 5, id_offsets=offsets)[1])


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_matches_faiss_merge_where_semantics_agree(metric, merge):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    # Distinct continuous distances, global ids, no padding, no NaN: the cases faiss defines the same way.
    distances, ids = make_shards(rng, 8, 200, 20, metric=metric)
    faiss_distances, faiss_ids = faiss.merge_knn_results(np.stack(distances), np.stack(ids), keep_max=metric == "ip")
    ours = merge(np.stack(distances), np.stack(ids), 20, metric=metric)
    np.testing.assert_array_equal(ours[1], faiss_ids)
    np.testing.assert_array_equal(ours[0], faiss_distances)


def test_ties_across_shards_break_by_smaller_id_whatever_the_shard_order(merge):
    distances = [np.array([[1.0, 2.0]], np.float32), np.array([[1.0, 2.0]], np.float32),
                 np.array([[1.0, 1.0]], np.float32)]
    ids = [np.array([[30, 4]]), np.array([[10, 2]]), np.array([[20, 7]])]
    expected_ids = [7, 10, 20, 30, 2]
    for permutation in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        out_distances, out_ids = merge([distances[p] for p in permutation], [ids[p] for p in permutation], 5)
        assert out_ids.tolist() == [expected_ids]
        assert out_distances.tolist() == [[1.0, 1.0, 1.0, 1.0, 2.0]]
    # ip: descending score, ties still by smaller id.
    _, out_ids = merge([np.array([[5.0, 1.0]], np.float32), np.array([[5.0, 3.0]], np.float32)],
                            [np.array([[9, 1]]), np.array([[8, 3]])], 4, metric="ip")
    assert out_ids.tolist() == [[8, 9, 3, 1]]


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_nan_after_every_number_and_before_padding(metric, merge):
    inf = np.inf if metric == "l2" else -np.inf
    distances = [np.array([[0.5, inf, np.nan, np.nan]], np.float32), np.array([[np.nan, 7.0]], np.float32)]
    ids = [np.array([[4, 5, 9, 1]]), np.array([[3, -1]])]
    out_distances, out_ids = merge(distances, ids, 7, metric=metric, sorted=False)
    assert out_ids.tolist() == [[4, 5, 1, 3, 9, -1, -1]]
    assert out_distances[0, 0] == 0.5 and out_distances[0, 1] == inf
    assert np.isnan(out_distances[0, 2:5]).all()
    assert (out_distances[0, 5:] == (np.inf if metric == "l2" else -np.inf)).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("sorted_rows", [True, False])
def test_padding_in_the_middle_and_at_the_end_never_outranks_and_is_never_offset(metric, sorted_rows, merge):
    sign = 1.0 if metric == "l2" else -1.0
    # Padding carries the best possible distance: it must still lose to every real candidate.
    distances = [sign * np.array([[1.0, -1e30, 3.0, -1e30]], np.float32),
                 sign * np.array([[2.0, -1e30]], np.float32)]
    ids = [np.array([[0, -1, 2, -1]]), np.array([[1, -1]])]
    out_distances, out_ids = merge(distances, ids, 6, metric=metric, sorted=sorted_rows,
                                        id_offsets=[100, 2**62])
    assert out_ids.tolist() == [[100, 2**62 + 1, 102, -1, -1, -1]]
    worst = np.inf if metric == "l2" else -np.inf
    assert (sign * out_distances[0, :3]).tolist() == [1.0, 2.0, 3.0]
    assert (out_distances[0, 3:] == worst).all()


def test_k_larger_than_all_candidates_and_k_one_and_single_shard(merge):
    distances = np.array([[[0.1, 0.2, 0.3]], [[0.15, 0.25, 0.35]]], np.float32)
    ids = np.array([[[0, 1, 2]], [[3, 4, 5]]])
    out_distances, out_ids = merge(distances, ids, 10)
    assert out_ids.tolist() == [[0, 3, 1, 4, 2, 5, -1, -1, -1, -1]]
    assert np.isinf(out_distances[0, 6:]).all() and (out_distances[0, 6:] > 0).all()
    assert merge(distances, ids, 1)[1].tolist() == [[0]]
    assert merge(distances[:1], ids[:1], 2)[1].tolist() == [[0, 1]]
    empty = merge(np.zeros((2, 0, 3), np.float32), np.zeros((2, 0, 3), np.int64), 4)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0, 4)


def test_dedup_keeps_the_best_occurrence(merge):
    # Replicated shards: the same id from three replicas, with slightly different distances.
    distances = [np.array([[0.3, 0.5, 0.9]], np.float32), np.array([[0.2, 0.5, 0.7]], np.float32),
                 np.array([[0.4, 0.6, 0.8]], np.float32)]
    ids = [np.array([[7, 8, 9]]), np.array([[8, 7, 3]]), np.array([[7, 3, 9]])]
    for sorted_rows in (True, False):
        out_distances, out_ids = merge(distances, ids, 5, dedup=True, sorted=sorted_rows)
        assert out_ids.tolist() == [[8, 7, 3, 9, -1]]
        np.testing.assert_allclose(out_distances[0, :4], [0.2, 0.3, 0.6, 0.8])
    assert merge(distances, ids, 5, dedup=False)[1].tolist() == [[8, 7, 7, 7, 8]]


def test_id_offsets_translate_and_overflow_is_an_error(merge):
    distances = np.array([[[0.1, 0.3]], [[0.2, 0.4]]], np.float32)
    ids = np.array([[[0, 1]], [[0, 1]]])
    for offsets in ([0, 2], np.array([0, 2]), torch.tensor([0, 2])):
        assert merge(distances, ids, 4, id_offsets=offsets)[1].tolist() == [[0, 2, 1, 3]]
    int64_max = np.iinfo(np.int64).max
    # The largest id that fits is fine; one more overflows.
    assert merge(distances, ids, 1, id_offsets=[0, int64_max - 1])[1].tolist() == [[0]]
    for sorted_rows in (True, False):
        for dedup in (False, True):
            with pytest.raises(ValueError, match=r"id_offsets\[1\].*int64"):
                merge(distances, ids, 4, id_offsets=[0, int64_max], sorted=sorted_rows, dedup=dedup)
            with pytest.raises(ValueError, match=r"id_offsets\[0\].*int64"):
                merge(distances, ids, 4, id_offsets=[-1, 0], sorted=sorted_rows, dedup=dedup)
    with pytest.raises(ValueError, match="id_offsets.*int64"):
        merge(distances, ids, 4, id_offsets=[0, 2**64 - 1])
    with pytest.raises(ValueError, match="id_offsets.*int64"):
        merge(distances, ids, 4, id_offsets=np.array([0, 2**64 - 1], dtype=np.uint64))


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rows_read_out_of_order_with_sorted_true_raise(metric, merge):
    sign = 1.0 if metric == "l2" else -1.0
    distances = [sign * np.array([[0.1, 0.5, 0.3, 0.9]], np.float32), sign * np.array([[0.2, 0.4]], np.float32)]
    ids = [np.array([[1, 2, 3, 4]]), np.array([[5, 6]])]
    with pytest.raises(ValueError, match=r"row 0 of distances\[0\] is not sorted best-first.*sorted=False"):
        merge(distances, ids, 4, metric=metric)
    assert merge(distances, ids, 4, metric=metric, sorted=False)[1].tolist() == [[1, 5, 3, 6]]
    if not is_warp(merge):  # the CPU op checks whole rows: a disorder past the candidates it reads raises too
        with pytest.raises(ValueError, match=r"row 0 of distances\[0\] is not sorted best-first"):
            merge(distances, ids, 2, metric=metric)
    else:  # the GPU algorithm checks only the candidates it reads (docs/topk_merge_gpu.md)
        assert merge(distances, ids, 2, metric=metric)[1].tolist() == [[1, 5]]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_sorted_true_checks_whole_rows_on_every_cpu_backend(metric, backend):
    """A row out of order outside the candidates the merge reads (issue 15): the CPU backends raise alike,
    never a silently wrong top-k (compiled) or a silent sort (reference). Padding anywhere is skipped."""
    sign = 1.0 if metric == "l2" else -1.0
    good = sign * np.array([[0.15, 0.25, 0.35, 0.45, 0.55]], np.float32)
    bad = sign * np.array([[0.1, 0.2, 0.3, 0.4, 0.0]], np.float32)  # the best candidate last
    ids = np.array([[1, 2, 3, 4, 5]])
    for layout in ("list", "stacked"):  # the stacked numpy input takes the small-call path
        d = [good, bad] if layout == "list" else np.stack([bad, bad])
        i = [ids, ids + 10] if layout == "list" else np.stack([ids, ids + 10])
        shard = 1 if layout == "list" else 0
        with pytest.raises(ValueError, match=rf"row 0 of distances\[{shard}\] is not sorted best-first.*sorted=False"):
            topk_merge(d, i, 2, metric=metric, backend=backend)
        expected = [[15, 11]] if layout == "list" else [[5, 15]]
        assert topk_merge(d, i, 2, metric=metric, backend=backend, sorted=False)[1].tolist() == expected
    # Padding (id -1) out of order is not a disorder; NaN last is sorted; a number after a NaN is not.
    padded = sign * np.array([[0.1, 9.0, 0.2, -9.0, 0.3]], np.float32)
    padded_ids = np.array([[1, -1, 2, -1, 3]])
    assert topk_merge([padded], [padded_ids], 3, metric=metric, backend=backend)[1].tolist() == [[1, 2, 3]]
    nan_last = np.array([[sign * 0.1, np.nan, np.nan]], np.float32)
    assert topk_merge([nan_last], [ids[:, :3]], 1, metric=metric, backend=backend)[1].tolist() == [[1]]
    with pytest.raises(ValueError, match="not sorted best-first"):
        topk_merge([nan_last[:, ::-1].copy()], [ids[:, :3]], 1, metric=metric, backend=backend)


# The sorted merge's float32 row passes have an AVX-512 build (csrc/topk_merge_cpu_avx512.h), taken where the CPU
# has it; KARMA_TOPK_MERGE_AVX512=0 turns it off. Both builds against the reference on the same inputs: widths
# around the 16-lane steps and the 48-wide threshold of the vector row check, k past the small merge.
@pytest.mark.parametrize("avx512", ["1", "0"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dedup", [False, True])
def test_sorted_merge_row_passes_with_and_without_avx512(avx512, metric, dedup, monkeypatch):
    monkeypatch.setenv("KARMA_TOPK_MERGE_AVX512", avx512)
    rng = np.random.default_rng(17)
    widths = [1, 15, 16, 17, 47, 48, 49, 100, 130]
    for tie_levels, nan_rate, padding_rate in ((None, 0.0, 0.0), (3, 0.05, 0.1), (40, 0.02, 0.0)):
        distances, ids = make_shards(rng, len(widths), 7, widths, metric=metric, tie_levels=tie_levels,
                                     nan_rate=nan_rate, padding_rate=padding_rate, id_range=300 if dedup else None)
        # -0 ties +0: shard 3's best candidates are zeros of both signs (its row stays sorted, NaN last).
        distances[3] = np.sort(np.abs(distances[3]), axis=1) * np.float32(-1 if metric == "ip" else 1)
        distances[3][:, :2] = -0.0
        distances[3][:, 2:4] = 0.0
        offsets = [int(x) for x in rng.integers(0, 1000, len(widths))]
        for k in (33, 100, 520):
            result = topk_merge(distances, ids, k, metric=metric, dedup=dedup, id_offsets=offsets)
            assert_same(result, expect(distances, ids, k, metric=metric, dedup=dedup, id_offsets=offsets))
    # Padding at the end of rows sorted including it (faiss's rows), and half-precision rows (ids copied by the
    # same vector pass).
    distances, ids = make_shards(rng, 4, 9, 64, metric=metric)
    for d, i in zip(distances, ids):
        d[:, 50:] = np.inf if metric == "l2" else -np.inf
        i[:, 50:] = -1
    assert_same(topk_merge(distances, ids, 100, metric=metric, dedup=dedup),
                expect(distances, ids, 100, metric=metric, dedup=dedup))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        tensors = [torch.from_numpy(d).to(dtype) for d in distances]
        truth = expect([t.double().numpy() for t in tensors], ids, 60, metric=metric, dedup=dedup)
        assert_same(topk_merge(tensors, [torch.from_numpy(i) for i in ids], 60, metric=metric, dedup=dedup), truth)
    # A disorder deep in a wide row (past every candidate the merge reads) raises with either build.
    distances, ids = make_shards(rng, 3, 5, 100, metric=metric)
    distances[1][3, 90] = distances[1][3, 0]
    with pytest.raises(ValueError, match=r"row 3 of distances\[1\] is not sorted best-first"):
        topk_merge(distances, ids, 40, metric=metric)


def test_deterministic_across_runs_and_thread_counts():
    rng = np.random.default_rng(6)
    distances, ids = make_shards(rng, 8, 3000, 30, tie_levels=3, nan_rate=0.02, padding_rate=0.05, id_range=500)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 2, 1, 2):
            torch.set_num_threads(num_threads)
            for sorted_rows in (True, False):
                results.append(topk_merge(distances, ids, 40, sorted=sorted_rows, dedup=True))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        np.testing.assert_array_equal(result[1], results[0][1])
        np.testing.assert_array_equal(result[0], results[0][0])
    assert_same(results[0], expect(distances, ids, 40, dedup=True))


def test_sorted_merge_over_thread_chunks_matches_reference():
    """Queries are handed out in chunks (668 here, the last one odd) and merged two at a time: every chunk boundary
    and the odd query left at a chunk's end give the reference's answer, on 1 and 2 threads."""
    rng = np.random.default_rng(16)
    distances, ids = make_shards(rng, 8, 2001, [30, 25, 30, 31, 30, 12, 30, 30], tie_levels=5, nan_rate=0.02,
                                 padding_rate=0.05, id_range=4000)
    want = expect(distances, ids, 40)
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            assert_same(topk_merge(distances, ids, 40), want)
            same_width = [0, 2, 4, 6, 7]  # stacked (the numpy small-call path's buffers)
            stacked = [distances[s] for s in same_width], [ids[s] for s in same_width]
            assert_same(topk_merge(np.stack(stacked[0]), np.stack(stacked[1]), 40), expect(*stacked, 40))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.parametrize("sorted_rows", [True, False])
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_matches_reference(sorted_rows, dedup, dtype):
    rng = np.random.default_rng(8)
    distances, ids = make_shards(rng, 16, 300, [100] * 15 + [37], sorted_rows=sorted_rows, tie_levels=6,
                                 nan_rate=0.02, padding_rate=0.05, id_range=3000 if dedup else None,
                                 dtype=getattr(np, dtype))
    offsets = [0] * 16 if dedup else list(range(0, 16000, 1000))
    out = topk_merge([torch.from_numpy(d).cuda() for d in distances], [torch.from_numpy(i).cuda() for i in ids],
                     100, sorted=sorted_rows, dedup=dedup, id_offsets=offsets, backend="compiled")
    assert out[0].is_cuda
    assert_same((out[0].cpu(), out[1].cpu()), expect(distances, ids, 100, dedup=dedup, id_offsets=offsets))


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dedup", [False, True])
def test_large_random_matches_reference(metric, dedup, merge):
    rng = np.random.default_rng(9)
    widths = [int(w) for w in rng.integers(0, 120, 24)]
    distances, ids = make_shards(rng, 24, 2000, widths, metric=metric, tie_levels=50, nan_rate=0.01,
                                 padding_rate=0.05, id_range=5000 if dedup else None)
    for sorted_rows in (True, False):
        result = merge(distances, ids, 100, metric=metric, dedup=dedup, sorted=sorted_rows)
        assert_same(result, expect(distances, ids, 100, metric=metric, dedup=dedup))


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_every_backend_returns_plus_zero_for_minus_zero(metric):
    """-0.0 ranks equal to +0.0 and comes back as +0.0 on every backend (the README's contract)."""
    distances = [np.array([[-0.0, 1.0], [0.0, -0.0]], np.float32), np.array([[-0.0, 2.0], [-0.0, 0.0]], np.float32)]
    ids = [np.array([[3, 4], [1, 2]]), np.array([[5, 6], [7, 8]])]
    if metric == "ip":
        distances = [-d for d in distances]
    for backend in ("reference", "compiled", "device_emulation"):
        out_distances, out_ids = topk_merge(distances, ids, 3, metric=metric, backend=backend)
        zeros = out_distances == 0
        assert zeros.sum() == 5, backend
        assert not np.signbit(out_distances[zeros]).any(), backend
