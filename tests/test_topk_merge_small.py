"""topk_merge's small-call path (csrc/topk_merge_numpy.cpp, karma_kernels._C.merge_small): a stacked numpy input
merged straight from its memory into outputs allocated in C, and the small merge it runs (csrc/topk_merge_cpu_small.h).
Everything it does not take, or that is an error, goes the op's way: same results, same errors."""
import re
import sys

import numpy as np
import pytest
import torch

from karma_kernels import topk_merge
from karma_kernels.topk_merge.op import _extension_loaded

from tests.test_topk_merge import make_shards


@pytest.fixture(scope="module")
def extension():
    if not _extension_loaded():
        pytest.fail("karma_kernels._C is not built: run `pip install --no-build-isolation -e .`")
    import karma_kernels._C as module
    return module


class Subclass(np.ndarray):
    pass


def small(extension, d, i, k, metric="l2", id_offsets=None, sorted=True, dedup=False, backend="auto"):
    return extension.merge_small(d, i, k, metric, id_offsets, sorted, dedup, backend)


def through_the_op(d, i, k, **options):
    """The same call through the op (tensors and backend="compiled": never the small-call path)."""
    out = topk_merge(torch.from_numpy(np.array(d)), torch.from_numpy(np.array(i)), k,
                     **{"backend": "compiled", **options})
    return out[0].numpy(), out[1].numpy()


def assert_equal(got, want):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])  # NaN in the same places; values selected, never computed
    assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype


def test_outputs_are_fresh_c_contiguous_arrays_of_the_input_dtype(extension):
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        for num_queries, k in ((1, 10), (5, 3), (0, 4), (3, 50)):  # no query; k past the 8 * 4 candidates
            distances, ids = make_shards(rng, 8, max(num_queries, 1), 4, dtype=dtype)
            d, i = np.stack(distances)[:, :num_queries], np.stack(ids)[:, :num_queries]
            out = small(extension, d, i, k)
            assert isinstance(out, tuple) and len(out) == 2
            for array, want_dtype in zip(out, (np.dtype(dtype), np.dtype(np.int64))):
                assert type(array) is np.ndarray and array.dtype == want_dtype and array.shape == (num_queries, k)
                assert array.flags.c_contiguous and array.flags.writeable and array.flags.owndata
            assert_equal(out, through_the_op(d, i, k))
            if k > 32:
                assert (out[1][:, 32:] == -1).all() and np.isposinf(out[0][:, 32:]).all()
    empty_rows = (np.zeros((3, 2, 0), np.float32), np.zeros((3, 2, 0), np.int64))  # no candidates: all padding
    for metric in ("l2", "ip"):
        assert_equal(small(extension, *empty_rows, 3, metric), through_the_op(*empty_rows, 3, metric=metric))


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("sorted_rows", [True, False])
def test_ties_nan_zeros_and_padding_equal_the_op(extension, metric, sorted_rows):
    rng = np.random.default_rng(2)
    for num_shards, num_queries, width in ((8, 64, 10), (3, 5, 1), (16, 9, 7), (17, 4, 6), (2, 300, 12)):
        distances, ids = make_shards(rng, num_shards, num_queries, width, metric=metric, sorted_rows=sorted_rows,
                                     tie_levels=3, nan_rate=0.1, padding_rate=0.15, id_range=40)
        d, i = np.stack(distances), np.stack(ids)
        d[d == 0] = -0.0 if metric == "l2" else 0.0  # -0 and +0 tie (then by id); 0 values are one of the levels
        for k in (1, 4, 10, 32, 33, 200):
            out = small(extension, d, i, k, metric, sorted=sorted_rows)
            assert out is not None, (num_shards, num_queries, width, k)
            assert_equal(out, through_the_op(d, i, k, metric=metric, sorted=sorted_rows))
            assert_equal(topk_merge(d, i, k, metric=metric, sorted=sorted_rows), out)


def test_a_shard_that_holds_the_whole_top_k_and_ties_past_it(extension):
    """One row gives all k outputs; rows whose k-th value repeats past k (the tie group cut by k) keep the
    smallest ids."""
    d = np.tile(np.arange(12, dtype=np.float32), (4, 2, 1))
    d[1:] += 100.0
    d[0, 1, 8:] = 7.0  # query 1: positions 7..11 of shard 0 all 7.0
    i = np.arange(4 * 2 * 12, dtype=np.int64)[::-1].reshape(4, 2, 12).copy()
    for k in (1, 8, 10, 12):
        assert_equal(small(extension, d, i, k), through_the_op(d, i, k))


def test_strided_reversed_readonly_and_odd_layouts_equal_the_op(extension):
    rng = np.random.default_rng(3)
    distances, ids = make_shards(rng, 8, 20, 10, tie_levels=4, nan_rate=0.05, padding_rate=0.1, id_range=60)
    d, i = np.stack(distances), np.stack(ids)
    readonly = d.copy()
    readonly.flags.writeable = False
    taken = [(d[:, ::-1], i[:, ::-1]), (d[::-2], i[::-2]), (readonly, i), (d.astype(np.float64), i),
             (np.ascontiguousarray(d.transpose(1, 0, 2)).transpose(1, 0, 2), i)]  # query-major
    for vd, vi in taken:
        assert_equal(small(extension, vd, vi, 10), through_the_op(vd, vi, 10))
    # Not taken (None), the op's path gives the answer: rows not contiguous, float16, big-endian, int32 ids,
    # an ndarray subclass, an unaligned view.
    unaligned = np.frombuffer(b"\0" + d.tobytes(), np.float32, count=d.size, offset=1).reshape(d.shape)
    refused = [(np.repeat(d, 2, axis=2)[:, :, ::2], i), (d.astype(np.float16), i), (d.astype(">f4"), i),
               (d, i.astype(np.int32)), (d.view(Subclass), i), (unaligned, i)]
    for vd, vi in refused:
        assert small(extension, vd, vi, 10) is None
    for vd, vi in refused[:2] + refused[4:]:
        assert_equal(topk_merge(vd, vi, 10), through_the_op(np.asarray(vd), vi, 10))


def test_every_argument_the_path_does_not_take_falls_back_to_the_ops_answer_or_error(extension):
    d = np.sort(np.random.default_rng(4).random((2, 3, 4), dtype=np.float32), axis=2)
    i = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    calls = [  # (k, options): each refused by merge_small; the wrapper then answers or raises as the op does
        (2, dict(metric="cosine")), (2, dict(backend="gpu")), (2, dict(sorted="yes")), (2, dict(dedup=1)),
        (2, dict(sorted=np.bool_(True))), (0, {}), (-1, {}), (2.0, {}), (True, {}), (np.int64(2), {}), (2**63, {}),
        (2**31 - 1, {}), (2, dict(id_offsets=[0, 1, 2])), (2, dict(id_offsets=[0, 2**63 - 1])),
        (2, dict(id_offsets=[0.0, 1.0])), (2, dict(id_offsets=[np.int64(0), 5])), (2, dict(id_offsets=[True, 0])),
        (2, dict(id_offsets=np.array([0, 5], np.int32))), (2, dict(dedup=True)),
        (2, dict(backend="reference")), (2, dict(metric="L2")),
    ]
    for k, options in calls:
        full = {**dict(metric="l2", id_offsets=None, sorted=True, dedup=False, backend="auto"), **options}
        assert small(extension, d, i, k, **full) is None, (k, options)
        try:
            want = topk_merge(torch.from_numpy(d), torch.from_numpy(i), k, **options)
        except (TypeError, ValueError) as error:
            with pytest.raises(type(error), match=re.escape(str(error))):
                topk_merge(d, i, k, **options)
        else:
            got = topk_merge(d, i, k, **options)
            np.testing.assert_array_equal(got[1], want[1].numpy())
    assert small(extension, list(d), i, 2) is None and small(extension, d[0], i[0], 2) is None
    assert small(extension, list(d), list(i[:, :, :3]), 2) is None and small(extension, [], [], 2) is None
    assert small(extension, d, i[:, :, :3], 2) is None and small(extension, d[:0], i[:0], 2) is None
    # sorted=True over a row out of order anywhere: refused, and the op's ValueError names the row.
    disordered = np.array([[[0.1, 0.5, 0.3, 0.9]], [[0.2, 0.4, 0.6, 0.7]]], np.float32)
    disordered_ids = np.arange(8).reshape(2, 1, 4)
    for k in (1, 4):
        assert small(extension, disordered, disordered_ids, k) is None
        with pytest.raises(ValueError, match=r"row 0 of distances\[0\] is not sorted best-first"):
            topk_merge(disordered, disordered_ids, k)
    with pytest.raises(TypeError, match="merge_small"):
        extension.merge_small(d, i, 2)


def test_no_reference_is_kept_or_lost(extension):
    d = np.sort(np.random.default_rng(5).random((8, 1, 10), dtype=np.float32), axis=2)
    i = np.arange(80, dtype=np.int64).reshape(8, 1, 10)
    before = (sys.getrefcount(d), sys.getrefcount(i))
    for _ in range(1000):
        out = small(extension, d, i, 10)
        assert sys.getrefcount(out[0]) == sys.getrefcount(out[1])
        assert small(extension, d, i, 10, metric="cosine") is None
    del out
    assert (sys.getrefcount(d), sys.getrefcount(i)) == before


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_whole_row_check_of_every_width_and_position(extension, metric):
    """sorted=True: a row out of order at any position (the float32 rows are checked four pairs at a time, the
    last step overlapping) is refused and raises; NaN last, infinities and padding anywhere are in order."""
    sign = 1.0 if metric == "l2" else -1.0
    for dtype in (np.float32, np.float64):
        for width in range(1, 14):
            row = sign * np.arange(1, width + 1, dtype=dtype)
            d = np.stack([np.tile(row, (2, 1)), np.tile(row + sign * 0.5, (2, 1))])  # (2 shards, 2 queries, width)
            i = np.arange(d.size, dtype=np.int64).reshape(d.shape)
            assert_equal(small(extension, d, i, 3, metric), through_the_op(d, i, 3, metric=metric))
            for j in range(1, width):
                bad = d.copy()
                bad[1, 1, j - 1], bad[1, 1, j] = bad[1, 1, j], bad[1, 1, j - 1]  # shard 1, query 1
                assert small(extension, bad, i, 2, metric) is None, (dtype, width, j)
                with pytest.raises(ValueError, match=r"row 1 of distances\[1\] is not sorted best-first"):
                    topk_merge(bad, i, 2, metric=metric)
            if width >= 3:
                odd = d.copy()
                odd[0, 0, -1] = np.nan  # NaN last: in order
                odd[0, 1, 0] = -sign * np.inf  # the best possible value first: in order
                padded = i.copy()
                padded[1, 0, width // 2] = -1  # padding in the middle, its distance anything
                odd[1, 0, width // 2] = sign * 1e9
                assert_equal(small(extension, odd, padded, 4, metric), through_the_op(odd, padded, 4, metric=metric))
                nan_first = d.copy()
                nan_first[0, 0, 0] = np.nan  # NaN before numbers: out of order
                assert small(extension, nan_first, i, 2, metric) is None


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_listed_shards_and_id_offsets_equal_the_op(extension, metric):
    """A small sorted call also takes a list (or tuple) of (Q, k_s) arrays, k_s unequal, and id offsets (what
    ShardedIndex.search passes); a larger or unsorted listed call is the op's."""
    rng = np.random.default_rng(6)
    widths = [10, 0, 3, 10, 7, 1, 10, 12]
    distances, ids = make_shards(rng, 8, 3, widths, metric=metric, tie_levels=4, nan_rate=0.05, padding_rate=0.1,
                                 id_range=30)
    offsets = [0, 1000, 2000, 3000, 4000, 5000, 6000, 2**62]
    for id_offsets in (None, offsets, tuple(offsets), np.array(offsets, np.int64)):
        for container in (list, tuple):
            for k in (1, 10, 32):
                got = small(extension, container(distances), container(ids), k, metric, id_offsets)
                assert got is not None
                want = topk_merge([torch.from_numpy(x) for x in distances], [torch.from_numpy(x) for x in ids], k,
                                  metric=metric, id_offsets=id_offsets)
                assert_equal(got, (want[0].numpy(), want[1].numpy()))
                assert_equal(topk_merge(container(distances), container(ids), k, metric=metric,
                                        id_offsets=id_offsets), got)
    stacked = (np.stack([x[:, :3] for x in distances if x.shape[1] >= 3]),
               np.stack([x[:, :3] for x in ids if x.shape[1] >= 3]))
    stacked_offsets = offsets[:len(stacked[0])]
    assert_equal(small(extension, *stacked, 5, metric, stacked_offsets),
                 through_the_op(*stacked, 5, metric=metric, id_offsets=stacked_offsets))
    big_queries = [np.repeat(x, 100, axis=0) for x in distances], [np.repeat(x, 100, axis=0) for x in ids]
    refused = [(list(distances) * 3, list(ids) * 3, 10, {}), (distances, ids, 33, {}),
               (distances, ids, 10, dict(sorted=False)), (*big_queries, 10, {}),
               ([torch.from_numpy(x) for x in distances], [torch.from_numpy(x) for x in ids], 10, {}),
               ([x.astype(np.float64) if s == 3 else x for s, x in enumerate(distances)], ids, 10, {}),
               (distances, [x[:, :-1] if x.shape[1] else x for x in ids], 10, {}),
               (distances, ids[:-1], 10, {}), (distances[:1] + [distances[1][:2]], ids[:1] + [ids[1][:2]], 10, {}),
               (stacked[0], list(stacked[1]), 5, {}), (*stacked, 5, dict(id_offsets=[0] * 7))]
    for d, i, k, options in refused:
        full = {**dict(metric=metric, id_offsets=None, sorted=True), **options}
        assert small(extension, d, i, k, **full) is None
    # An id its offset takes out of int64: refused, and the op's error.
    overflow = [0] * 7 + [2**63 - 1]
    assert small(extension, distances, ids, 10, metric, overflow) is None
    with pytest.raises(ValueError, match=r"id_offsets\[7\].*int64"):
        topk_merge(distances, ids, 10, metric=metric, id_offsets=overflow)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_stacked_cpu_tensors_take_the_path_and_come_back_as_tensors(extension, dtype, monkeypatch):
    """A stacked pair of plain CPU tensors (float32/float64, rows contiguous) goes through the small-call path and
    comes back as tensors; float16/bfloat16, subclasses, rows that are not contiguous, and any call made while a
    Python mode is active go the op's way. Same results, same errors, either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from karma_kernels.topk_merge import op

    answers = []
    real = op._merge_small
    monkeypatch.setattr(op, "_merge_small", lambda *args: answers.append(real(*args)) or answers[-1])
    rng = np.random.default_rng(3)
    distances, ids = make_shards(rng, 8, 6, 12, dtype=np.float32)
    d = torch.from_numpy(np.stack(distances)).to(dtype)
    i = torch.from_numpy(np.stack(ids))
    takes = dtype in (torch.float32, torch.float64)
    cases = [("plain", d, i, takes), ("requires_grad", d.clone().requires_grad_(dtype != torch.bfloat16), i, takes),
             ("a subclass (Parameter)", torch.nn.Parameter(d.clone(), requires_grad=False), i, False),
             ("strided", d[:, ::2], i[:, ::2], takes),
             ("rows not contiguous", d.transpose(1, 2).contiguous().transpose(1, 2),
              i.transpose(1, 2).contiguous().transpose(1, 2), False)]
    for name, dd, ii, taken in cases:
        answers.clear()
        got = topk_merge(dd, ii, 10)
        want = topk_merge(dd.detach().clone(), ii.clone(), 10, backend="compiled")
        assert type(got[0]) is torch.Tensor and got[0].dtype == dtype and got[1].dtype == torch.int64, name
        assert not got[0].requires_grad and got[0].is_contiguous() and got[1].is_contiguous(), name
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got[1], want[1]), name
        assert any(answer is not None for answer in answers) == taken, name

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    answers.clear()
    with Seen():
        under_mode = topk_merge(d, i, 10)
    assert not answers and any("topk_merge" in name for name in Seen.ops)
    assert torch.equal(under_mode[1], topk_merge(d, i, 10, backend="compiled")[1])
    unsorted = d.clone()
    unsorted[2, 4, [3, 9]] = unsorted[2, 4, [9, 3]]
    messages = []
    for backend in ("auto", "compiled"):
        with pytest.raises(ValueError) as error:
            topk_merge(unsorted, i, 10, backend=backend)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "row 4 of distances[2]" in messages[0]
    with pytest.raises(TypeError, match="dense"):
        topk_merge(d.to_sparse(), i, 10)
