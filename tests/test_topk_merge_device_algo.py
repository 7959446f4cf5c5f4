"""The GPU merge's warp algorithm (csrc/topk_merge_warp.h) where it differs from the CPU merge: keys computed on
the stored bits of every fp16/bf16 value, the select's tie cut on ids, and the limits of the warp path. It runs
here as the host build (32 lanes in lockstep, backend="device_emulation"); tests/test_topk_merge.py runs every
parity case against it too."""
import numpy as np
import pytest
import torch

from karma_kernels import topk_merge
from karma_kernels.topk_merge import topk_merge_reference

EMULATED = "device_emulation"


def reference(distances, ids, k, *, metric="l2", dedup=False):
    return topk_merge_reference([np.asarray(d, dtype=np.float64) for d in distances], ids, k,
                                largest=metric == "ip", dedup=dedup)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # NaN payloads
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_every_16_bit_value_keeps_its_rank_and_its_bits(dtype, metric):
    # All 65536 bit patterns (both zeros, subnormals, infinities, every NaN payload), 256 per query, unsorted,
    # each query's result its whole row in rank order.
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).reshape(256, 256)
    shards = list(values.reshape(256, 4, 64).unbind(1))  # four shards of 64 per query
    ids = [torch.arange(64 * s, 64 * s + 64).expand(256, 64).contiguous() for s in range(4)]
    out_distances, out_ids = topk_merge(shards, ids, 256, metric=metric, sorted=False, backend=EMULATED)
    truth = reference([d.float().numpy() for d in shards], [i.numpy() for i in ids], 256, metric=metric)
    np.testing.assert_array_equal(out_ids.numpy(), truth[1])
    np.testing.assert_array_equal(out_distances.float().numpy(), truth[0])
    # Same bits as the CPU op writes: NaN as the canonical NaN, -0 as +0.
    cpu = topk_merge(shards, ids, 256, metric=metric, sorted=False)
    assert torch.equal(out_distances.view(torch.int16), cpu[0].view(torch.int16))


@pytest.mark.parametrize("dedup", [False, True])
def test_tie_group_cut_by_the_smallest_ids_equal_ids_included(dedup):
    # Every candidate at one of two distances, ids drawn from a small range (repeats within a query): the k-th
    # key's tie group is cut by a radix select over its ids, and the cut may fall inside a run of equal ids.
    rng = np.random.default_rng(21)
    num_queries, widths = 16, [33, 64, 5, 70]
    distances = [rng.integers(0, 2, (num_queries, w)).astype(np.float32) for w in widths]
    ids = [rng.integers(0, 30, (num_queries, w)) * (2**40 + 1) for w in widths]  # ids with high bits set
    for k in (1, 7, 31, 32, 33, 100, 171):
        for metric in ("l2", "ip"):
            out = topk_merge(distances, ids, k, metric=metric, sorted=False, dedup=dedup, backend=EMULATED)
            truth = reference(distances, ids, k, metric=metric, dedup=dedup)
            np.testing.assert_array_equal(out[1], truth[1])
            np.testing.assert_array_equal(out[0], truth[0])


def test_padding_everywhere_then_the_select_repeats_until_none_is_left():
    # Most candidates are padding carrying the best distances: each select round meets new padding.
    rng = np.random.default_rng(22)
    distances = [np.sort(rng.standard_normal((20, 48)).astype(np.float32), axis=1) for _ in range(3)]
    ids = [np.where(rng.random((20, 48)) < 0.8, -1, rng.integers(0, 10**6, (20, 48))) for _ in range(3)]
    for k in (1, 10, 40, 200):
        out = topk_merge(distances, ids, k, sorted=False, backend=EMULATED)
        truth = reference(distances, ids, k)
        np.testing.assert_array_equal(out[1], truth[1])
        np.testing.assert_array_equal(out[0], truth[0])


def test_the_warp_path_refuses_what_one_warp_cannot_hold():
    d = np.zeros((2, 1, 40000), np.float32)
    i = np.zeros((2, 1, 40000), np.int64)
    with pytest.raises(ValueError, match="one warp's shared memory"):
        topk_merge(d, i, 10000, backend=EMULATED)
    with pytest.raises(ValueError, match="at most 64 shards per call"):
        topk_merge(np.zeros((65, 1, 2), np.float32), np.zeros((65, 1, 2), np.int64), 2, backend=EMULATED)


def test_opcheck_of_the_emulated_op():
    rng = np.random.default_rng(23)
    d = [torch.from_numpy(np.sort(rng.random((5, w), dtype=np.float32), axis=1)) for w in (4, 1, 6)]
    i = [torch.from_numpy(rng.integers(0, 100, (5, w))) for w in (4, 1, 6)]
    for args in ((d, i, 6, False, torch.tensor([0, 100, 200]), True, False), (d, i, 3, True, None, False, True)):
        torch.library.opcheck(torch.ops.karma.topk_merge_warp_emulated.default, args)
