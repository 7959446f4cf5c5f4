"""The oracle of ``topk_merge``: concatenate every shard's candidates, sort them in the total order, take k.

It reads all S*k_s candidates and sorts them (the compiled op merges about k+S per query); it is the
definition of the semantics, used by the tests and as the fallback when the extension is not built.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

INT64_MAX = np.iinfo(np.int64).max


def translate_ids(local_ids: np.ndarray, offset: int, shard: int) -> np.ndarray:
    """Local -> global ids; negative ids are padding and stay -1. Leaving [0, INT64_MAX] is an error."""
    padding = local_ids < 0
    real = local_ids[~padding]
    if offset != 0 and real.size:
        # Compare in Python integers: no int64 wrap can hide an overflow.
        lowest, highest = int(real.min()) + offset, int(real.max()) + offset
        if lowest < 0 or highest > INT64_MAX:
            bad = int(real.max()) if highest > INT64_MAX else int(real.min())
            raise ValueError(f"topk_merge: id_offsets[{shard}] = {offset} translates local id {bad} out of the "
                             "int64 range [0, 2^63-1] (an error, never a wrap)")
    return np.where(padding, np.int64(-1), local_ids + np.int64(offset))


def check_rows_sorted(distances: Sequence[np.ndarray], ids: Sequence[np.ndarray], largest: bool) -> None:
    """sorted=True's contract over whole rows, as the compiled CPU op checks it: in every shard row, each real
    candidate (id >= 0; padding anywhere is skipped) is no better than the real candidate before it, NaN last.
    Raises the compiled op's ValueError naming the first bad (query, shard)."""
    first_bad = None  # (query, shard)
    for s, (d, i) in enumerate(zip(distances, ids)):
        d = np.asarray(d, dtype=np.float64)
        real = np.asarray(i) >= 0
        nan = np.isnan(d) & real
        number = real & ~nan
        key = np.where(number, -d if largest else d, -np.inf)
        before = np.maximum.accumulate(key, axis=1)[:, :-1]  # the worst real number so far
        nan_before = np.logical_or.accumulate(nan, axis=1)[:, :-1]
        bad = number[:, 1:] & ((key[:, 1:] < before) | nan_before)
        rows = np.flatnonzero(bad.any(axis=1))
        if rows.size and (first_bad is None or rows[0] < first_bad[0]):
            first_bad = (int(rows[0]), s)
    if first_bad is not None:
        raise ValueError(f"topk_merge: row {first_bad[0]} of distances[{first_bad[1]}] is not sorted best-first "
                         f"({'descending' if largest else 'ascending'}, NaN last); pass sorted=False for "
                         "unsorted rows")


def topk_merge_reference(distances: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int, *,
                         largest: bool = False, id_offsets: Optional[Sequence[int]] = None,
                         dedup: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Merge S shards' (Q, k_s) rows into the global best k per query.

    Order: ascending distance (``largest=False``, "l2") or descending score (``largest=True``, "ip"); NaN after
    every number; equal distances by smaller global id. A negative id is padding: never offset, never ranked;
    rows with fewer than k real candidates end with id -1 and +inf ("l2") / -inf ("ip"). ``dedup`` keeps only
    the best occurrence of each global id. Returns float64 distances (exact copies of the inputs, except that
    -0.0 is returned as +0.0 and every NaN as the canonical NaN) and int64 ids.
    """
    num_queries = distances[0].shape[0]
    all_distances = np.concatenate([np.asarray(d, dtype=np.float64) for d in distances], axis=1)
    all_ids = np.concatenate([
        translate_ids(np.asarray(i, dtype=np.int64), 0 if id_offsets is None else int(id_offsets[s]), s)
        for s, i in enumerate(ids)], axis=1)
    width = all_distances.shape[1]
    if width < k:  # so that the first k slots always exist; the extra slots are padding
        all_distances = np.pad(all_distances, ((0, 0), (0, k - width)))
        all_ids = np.pad(all_ids, ((0, 0), (0, k - width)), constant_values=-1)
    padding = all_ids < 0
    nan = np.isnan(all_distances)
    key = np.where(nan, 0.0, -all_distances if largest else all_distances)
    # np.lexsort: the last key is the primary one. Padding last, then NaN, then the distance, then the id.
    order = np.lexsort((all_ids, key, nan, padding), axis=1)
    ranked_distances = np.take_along_axis(all_distances, order, axis=1)
    ranked_ids = np.take_along_axis(all_ids, order, axis=1)
    keep = ranked_ids >= 0
    if dedup:
        # Group equal ids (rank order inside a group) and keep each group's first, i.e. best, occurrence.
        rank = np.broadcast_to(np.arange(ranked_ids.shape[1]), ranked_ids.shape)
        by_id = np.lexsort((rank, ranked_ids), axis=1)
        grouped_ids = np.take_along_axis(ranked_ids, by_id, axis=1)
        first = np.ones_like(grouped_ids, dtype=bool)
        first[:, 1:] = grouped_ids[:, 1:] != grouped_ids[:, :-1]
        first_in_rank_order = np.empty_like(first)
        np.put_along_axis(first_in_rank_order, by_id, first, axis=1)
        keep &= first_in_rank_order
    # The first k kept entries of each row, in rank order (a stable sort moves the kept ones to the front).
    selected = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out_distances = np.take_along_axis(ranked_distances, selected, axis=1)
    out_ids = np.take_along_axis(ranked_ids, selected, axis=1)
    is_real = np.arange(k) < keep.sum(axis=1, keepdims=True)
    # Like the compiled op: -0.0 comes back as +0.0 (x + 0.0 rounds -0.0 to +0.0), every NaN as the canonical NaN.
    out_distances = np.where(is_real, np.where(np.isnan(out_distances), np.nan, out_distances + 0.0),
                             -np.inf if largest else np.inf)
    out_ids = np.where(is_real, out_ids, np.int64(-1))
    return out_distances.reshape(num_queries, k), out_ids.reshape(num_queries, k).astype(np.int64)
