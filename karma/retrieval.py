"""Exact sharded retrieval: S faiss indexes over disjoint slices of the items, searched in parallel threads and
merged with ``karma_kernels.topk_merge``.

Each shard answers its own top-k (faiss releases the GIL, so threads run the shards concurrently); the merge
keeps the global best k per query in a total order (ties by smaller global id), so for exact indexes the result
equals one unsharded ``faiss.IndexFlat`` over all items, ids and distances. Global id = local id + the shard's
id offset (default: the cumulative ``ntotal`` of the shards before it, i.e. the row index for ``build``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

from karma_kernels import topk_merge

METRICS = ("l2", "ip")


def _import_faiss():
    try:
        import faiss
    except ImportError as error:  # depends on the environment
        raise ImportError("ShardedIndex needs faiss: pip install 'karma-kernels[faiss]' (or faiss-cpu)") from error
    return faiss


def _faiss_metric(faiss, metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


class ShardedIndex:
    """S faiss indexes over disjoint item slices, searched as one.

    Args:
        shards: faiss indexes of one dimension and the metric ``metric`` (Flat, IVF, HNSW, ... any faiss index).
        metric: "l2" (ascending squared distance) or "ip" (descending inner product).
        id_offsets: S integers added to each shard's local ids; default the cumulative ``ntotal`` of the shards
            before it. Pass zeros for shards that already return global ids (``IndexIDMap``).
        max_workers: threads that search the shards concurrently (default: one per shard).
    """

    def __init__(self, shards: Sequence, *, metric: str = "l2", id_offsets: Optional[Sequence[int]] = None,
                 max_workers: Optional[int] = None):
        faiss = _import_faiss()
        if metric not in METRICS:
            raise ValueError(f"ShardedIndex: metric must be one of {METRICS}, got {metric!r}")
        shards = list(shards) if isinstance(shards, (list, tuple)) else shards
        if not isinstance(shards, list) or not shards:
            raise ValueError("ShardedIndex: shards must be a non-empty list of faiss indexes")
        for s, shard in enumerate(shards):
            if not isinstance(shard, faiss.Index):
                raise TypeError(f"ShardedIndex: shards[{s}] must be a faiss.Index, got {type(shard).__name__}")
            if shard.metric_type != _faiss_metric(faiss, metric):
                raise ValueError(f"ShardedIndex: shards[{s}] uses faiss metric {shard.metric_type}, but metric is "
                                 f"{metric!r}")
            if shard.d != shards[0].d:
                raise ValueError(f"ShardedIndex: shards[{s}] has dimension {shard.d}, shards[0] has {shards[0].d}")
        if id_offsets is None:
            id_offsets = np.concatenate([[0], np.cumsum([shard.ntotal for shard in shards])[:-1]]).tolist()
        elif len(id_offsets) != len(shards):
            raise ValueError(f"ShardedIndex: id_offsets must have one entry per shard ({len(shards)}), got "
                             f"{len(id_offsets)}")
        if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int)
                                        or max_workers < 1):
            raise ValueError(f"ShardedIndex: max_workers must be an int >= 1 or None, got {max_workers!r}")
        self.shards = shards
        self.metric = metric
        self.id_offsets = [int(offset) for offset in id_offsets]
        self.d = shards[0].d
        self.max_workers = max_workers or len(shards)
        self._executor: Optional[ThreadPoolExecutor] = None

    @classmethod
    def build(cls, vectors: np.ndarray, num_shards: int, *, metric: str = "l2", factory: str = "Flat",
              train: bool = True, max_workers: Optional[int] = None) -> "ShardedIndex":
        """Split ``vectors`` (N, D) into ``num_shards`` contiguous disjoint row slices, one faiss index each
        (``faiss.index_factory(D, factory, metric)``, trained on its own slice when ``train`` and untrained);
        the global id of an item is its row index."""
        faiss = _import_faiss()
        if metric not in METRICS:
            raise ValueError(f"ShardedIndex.build: metric must be one of {METRICS}, got {metric!r}")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
            raise ValueError(f"ShardedIndex.build: vectors must be a non-empty 2-D (N, D) array, got shape "
                             f"{vectors.shape}")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise TypeError(f"ShardedIndex.build: vectors must be floating, got {vectors.dtype}")
        if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
            raise ValueError(f"ShardedIndex.build: num_shards must be an int >= 1, got {num_shards!r}")
        if num_shards > vectors.shape[0]:
            raise ValueError(f"ShardedIndex.build: num_shards ({num_shards}) exceeds the number of vectors "
                             f"({vectors.shape[0]})")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        shards = []
        for part in np.array_split(vectors, int(num_shards)):
            shard = faiss.index_factory(vectors.shape[1], factory, _faiss_metric(faiss, metric))
            if train and not shard.is_trained:
                shard.train(part)
            shard.add(part)
            shards.append(shard)
        return cls(shards, metric=metric, max_workers=max_workers)

    @property
    def ntotal(self) -> int:
        return int(sum(shard.ntotal for shard in self.shards))

    def _search_shard(self, shard, queries: np.ndarray, k: int):
        width = min(k, shard.ntotal)
        if width == 0:  # an empty shard contributes nothing
            return (np.empty((queries.shape[0], 0), np.float32), np.empty((queries.shape[0], 0), np.int64))
        return shard.search(queries, width)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of every query over all shards: (Q, k) float32 distances and int64 global ids, best first;
        id -1 with +inf ("l2") / -inf ("ip") where fewer than k items exist."""
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.d:
            raise ValueError(f"ShardedIndex.search: queries must be 2-D (Q, {self.d}), got shape {queries.shape}")
        if not np.issubdtype(queries.dtype, np.floating):
            raise TypeError(f"ShardedIndex.search: queries must be floating, got {queries.dtype}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ShardedIndex.search: k must be an int >= 1, got {k!r}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(self.shards) == 1 or self.max_workers == 1:
            results = [self._search_shard(shard, queries, int(k)) for shard in self.shards]
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.max_workers,
                                                    thread_name_prefix="karma-shard-search")
            results = list(self._executor.map(lambda shard: self._search_shard(shard, queries, int(k)),
                                              self.shards))
        # faiss returns rows sorted best-first, padded with -1: the k-way merge reads about k + S per query.
        return topk_merge([r[0] for r in results], [r[1] for r in results], int(k), metric=self.metric,
                          id_offsets=self.id_offsets, sorted=True)

    def close(self) -> None:
        """Stops the search threads (a later search starts them again)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)


# One Ray actor per shard replica, same interface (Ray itself is imported only when an index is built).
from .ray_index import RayShardedIndex  # noqa: E402
