"""Shard-per-actor retrieval with Ray: the same interface as ``karma.retrieval.ShardedIndex``.

Each shard's faiss index lives in its own Ray actor (``replicas`` actors per shard, each holding a copy), so the
shards can sit on different hosts of a Ray cluster. A search puts the queries in the object store once, sends
every shard a reference to them, and merges the shards' (distance, id) lists with ``karma_kernels.topk_merge``
(global ids = local ids + the shard's id offset, as in ``ShardedIndex``).

Failures never shorten a result. When a shard's actor dies (or does not answer within ``timeout_s``) the query
is retried on another replica of that shard; with no replica left the search raises
``RuntimeError("shard 3 (actor ...) failed: ...")``. ``hedge=True`` sends each shard's query to every live
replica, takes whatever replies have arrived once every shard has at least one, and merges them with
``dedup=True`` (replicas return the same ids). Ray is an optional extra: ``pip install .[ray]``.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

_METRICS = ("l2", "ip")


def _import_ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("RayShardedIndex needs Ray: pip install 'karma-kernels[ray]'") from exc
    return ray


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("RayShardedIndex needs faiss: pip install 'karma-kernels[faiss]'") from exc
    return faiss


def _faiss_metric(faiss, metric: str):
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


class _ShardServer:
    """Runs inside a Ray actor: holds one shard's faiss index and answers searches on it."""

    def __init__(self, index_bytes=None, vectors=None, factory: str = "Flat", metric: str = "l2",
                 omp_threads: Optional[int] = None):
        import faiss

        if omp_threads is not None:
            faiss.omp_set_num_threads(int(omp_threads))
        if index_bytes is not None:
            self.index = faiss.deserialize_index(np.asarray(index_bytes, dtype=np.uint8))
        else:
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            self.index = faiss.index_factory(vectors.shape[1], factory, _faiss_metric(faiss, metric))
            if not self.index.is_trained:
                self.index.train(vectors)
            self.index.add(vectors)

    def info(self) -> Tuple[int, int]:
        return int(self.index.ntotal), int(self.index.d)

    def serialize(self):
        import faiss

        return faiss.serialize_index(self.index)

    def search(self, queries: np.ndarray, k: int):
        return self.index.search(queries, k)


@functools.lru_cache(maxsize=None)
def _remote_server_class():
    # Built lazily so importing this module needs neither Ray nor a running cluster.
    ray = _import_ray()
    return ray.remote(max_restarts=0, max_task_retries=0)(_ShardServer)


@dataclass
class PendingSearch:
    """A search in flight: ``result()`` waits for the shards, retries failed ones on replicas and merges.

    ``actors[s]`` is the actor handle shard ``s`` was first sent to (the others, with ``hedge=True``, are in
    ``tasks``).
    """
    index: "RayShardedIndex"
    queries_ref: Any
    k: int
    num_queries: int
    tasks: List[List[Tuple[int, Any]]]  # per shard: (replica, object ref) in the order sent
    actors: List[Any]
    started: float = field(default_factory=time.perf_counter)

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        return self.index._finish(self)


class RayShardedIndex:
    """Sharded exact/ANN search with one Ray actor per shard (per replica); results merged with topk_merge.

    ``shards``: faiss indexes (serialised once, put in the object store once, loaded by each replica's actor).
    ``metric``: "l2" (smaller is closer) or "ip" (larger is closer). ``id_offsets``: the global id of each
    shard's local id 0 (default: cumulative ``ntotal``, as in ``ShardedIndex``). ``replicas``: actors per shard.
    ``actor_options``: passed to ``.options()`` of every actor (e.g. ``{"num_cpus": 1}`` or a node resource).
    ``omp_threads``: faiss threads inside each actor (None: faiss's default). ``timeout_s``: how long to wait for
    one shard's reply before trying a replica (None: wait). Use as a context manager or call ``shutdown()``.
    """

    def __init__(self, shards: Optional[Sequence[Any]] = None, *, metric: str = "l2",
                 id_offsets: Optional[Sequence[int]] = None, replicas: int = 1, hedge: bool = False,
                 actor_options: Optional[Dict[str, Any]] = None, omp_threads: Optional[int] = None,
                 timeout_s: Optional[float] = None, _actors: Optional[List[List[Any]]] = None):
        if metric not in _METRICS:
            raise ValueError(f"RayShardedIndex: metric must be one of {_METRICS}, got {metric!r}")
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"RayShardedIndex: replicas must be an integer >= 1, got {replicas!r}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"RayShardedIndex: timeout_s must be > 0 or None, got {timeout_s!r}")
        ray = _import_ray()
        self._ray = ray
        self.metric = metric
        self.replicas = replicas
        self.hedge = bool(hedge)
        self.timeout_s = timeout_s
        self.last_timing: Dict[str, float] = {}
        self._calls = 0
        if _actors is None:
            if not shards:
                raise ValueError("RayShardedIndex: shards must be a non-empty list of faiss indexes")
            faiss = _import_faiss()
            if not ray.is_initialized():
                ray.init(include_dashboard=False)
            server = _remote_server_class().options(**(actor_options or {}))
            _actors = []
            for shard in shards:
                if not isinstance(shard, faiss.Index):
                    raise TypeError(f"RayShardedIndex: shards must be faiss indexes, got {type(shard).__name__}")
                blob = ray.put(faiss.serialize_index(shard))
                _actors.append([server.remote(index_bytes=blob, omp_threads=omp_threads)
                                for _ in range(replicas)])
        self._actors = _actors
        self._dead = [[False] * len(group) for group in _actors]
        # Wait for every replica: construction errors surface here, and the first search pays no start-up.
        replies = ray.get([actor.info.remote() for group in _actors for actor in group])
        infos, at = [], 0
        for shard, group in enumerate(_actors):
            sizes = {replies[at + r] for r in range(len(group))}
            if len(sizes) != 1:
                raise RuntimeError(f"RayShardedIndex: the replicas of shard {shard} differ: {sorted(sizes)}")
            infos.append(replies[at])
            at += len(group)
        self.shard_sizes = [n for n, _ in infos]
        dims = {d for _, d in infos}
        if len(dims) != 1:
            raise ValueError(f"RayShardedIndex: shards have different dimensions {sorted(dims)}")
        self.d = dims.pop()
        if id_offsets is None:
            id_offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64).tolist()
        id_offsets = [int(o) for o in id_offsets]
        if len(id_offsets) != len(_actors):
            raise ValueError(f"RayShardedIndex: id_offsets needs one entry per shard ({len(_actors)}), "
                             f"got {len(id_offsets)}")
        self.id_offsets = id_offsets

    @classmethod
    def build(cls, vectors, num_shards: int, *, metric: str = "l2", factory: str = "Flat", replicas: int = 1,
              hedge: bool = False, actor_options: Optional[Dict[str, Any]] = None,
              omp_threads: Optional[int] = None, timeout_s: Optional[float] = None) -> "RayShardedIndex":
        """Split ``vectors`` (N x D) into ``num_shards`` contiguous parts and build each inside its actor.

        Replica 0 of each shard builds (all shards in parallel); the other replicas load its serialised index,
        so replicas are identical even for trained index types.
        """
        if metric not in _METRICS:
            raise ValueError(f"RayShardedIndex.build: metric must be one of {_METRICS}, got {metric!r}")
        vectors = _as_float32_matrix("RayShardedIndex.build", "vectors", vectors)
        if not isinstance(num_shards, int) or not 1 <= num_shards <= max(1, vectors.shape[0]):
            raise ValueError(f"RayShardedIndex.build: num_shards must be an integer in [1, {vectors.shape[0]}], "
                             f"got {num_shards!r}")
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"RayShardedIndex.build: replicas must be an integer >= 1, got {replicas!r}")
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        server = _remote_server_class().options(**(actor_options or {}))
        actors = []
        for part in np.array_split(vectors, num_shards):
            builder = server.remote(vectors=ray.put(np.ascontiguousarray(part)), factory=factory, metric=metric,
                                    omp_threads=omp_threads)
            blob = builder.serialize.remote() if replicas > 1 else None
            actors.append([builder] + [server.remote(index_bytes=blob, omp_threads=omp_threads)
                                       for _ in range(replicas - 1)])
        return cls(metric=metric, replicas=replicas, hedge=hedge, timeout_s=timeout_s, _actors=actors)

    # ------------------------------------------------------------------ search
    @property
    def ntotal(self) -> int:
        return int(sum(self.shard_sizes))

    @property
    def num_shards(self) -> int:
        return len(self._actors)

    @property
    def shard_actors(self) -> List[List[Any]]:
        """Actor handles, ``[shard][replica]``."""
        return [list(group) for group in self._actors]

    def _live_replicas(self, shard: int) -> List[int]:
        group = self._dead[shard]
        start = self._calls % len(group)  # rotate the first choice to spread load over replicas
        order = [(start + i) % len(group) for i in range(len(group))]
        return [r for r in order if not group[r]]

    def search_async(self, queries, k: int) -> PendingSearch:
        """Send the search to the shards and return at once; ``.result()`` gives ``(D, I)``."""
        queries = _as_float32_matrix("RayShardedIndex.search", "queries", queries)
        if queries.shape[1] != self.d:
            raise ValueError(f"RayShardedIndex.search: queries must have {self.d} columns, got {queries.shape[1]}")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"RayShardedIndex.search: k must be a positive integer, got {k!r}")
        k = int(k)
        self._calls += 1
        queries_ref = self._ray.put(queries)  # once; every shard reads the same object
        tasks, first_actors = [], []
        for shard in range(self.num_shards):
            live = self._live_replicas(shard)
            if not live:
                raise RuntimeError(f"shard {shard} (actors {self._describe(shard)}) failed: no live replica left")
            chosen = live if self.hedge else live[:1]
            tasks.append([(r, self._actors[shard][r].search.remote(queries_ref, k)) for r in chosen])
            first_actors.append(self._actors[shard][chosen[0]])
        return PendingSearch(self, queries_ref, k, queries.shape[0], tasks, first_actors)

    def search(self, queries, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest items of each query over all shards: ``(D, I)``, each (Q, k), faiss layout.

        Rows hold -1 ids (and +inf / -inf distances) past the total number of items, as faiss does.
        """
        return self.search_async(queries, k).result()

    def _describe(self, shard: int, replica: Optional[int] = None) -> str:
        actors = self._actors[shard] if replica is None else [self._actors[shard][replica]]
        return ", ".join(a._actor_id.hex()[:12] for a in actors)

    def _collect(self, pending: PendingSearch, shard: int) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Replies for one shard (one, or several with hedging); retries on replicas; raises naming the shard."""
        ray = self._ray
        tasks = list(pending.tasks[shard])
        tried = {r for r, _ in tasks}
        errors: List[str] = []
        while True:
            refs = [ref for _, ref in tasks]
            ready, _ = ray.wait(refs, num_returns=1, timeout=self.timeout_s)
            if not ready:  # timed out: every in-flight replica is silent; ask one not tried yet, if any
                errors.extend(f"replica {r} (actor {self._describe(shard, r)}) gave no reply within "
                              f"{self.timeout_s} s" for r, _ in tasks)
                tasks = []
            else:
                replies, failed = [], []
                # Take every reply that is already there (hedging); at least the first ready one.
                done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0] if self.hedge else ready)
                for r, ref in tasks:
                    if ref not in done:
                        continue
                    try:
                        replies.append(ray.get(ref))
                    except ray.exceptions.RayActorError as exc:
                        self._dead[shard][r] = True
                        failed.append(r)
                        errors.append(f"replica {r} (actor {self._describe(shard, r)}): "
                                      f"{type(exc).__name__}: {_first_line(exc)}")
                    except ray.exceptions.RayError as exc:
                        # The shard's own search raised: a replica would raise the same, so do not retry.
                        raise RuntimeError(f"shard {shard} (actor {self._describe(shard, r)}) failed: "
                                           f"{type(exc).__name__}: {_first_line(exc)}") from exc
                if replies:
                    return replies
                tasks = [(r, ref) for r, ref in tasks if r not in failed]
            if not tasks:
                spare = [r for r in self._live_replicas(shard) if r not in tried]
                if not spare:
                    detail = "; ".join(errors) if errors else "no live replica"
                    raise RuntimeError(f"shard {shard} (actor {self._describe(shard)}) failed: {detail}")
                tried.add(spare[0])
                tasks = [(spare[0], self._actors[shard][spare[0]].search.remote(pending.queries_ref,
                                                                                 pending.k))]

    def _finish(self, pending: PendingSearch) -> Tuple[np.ndarray, np.ndarray]:
        from karma_kernels import topk_merge

        per_shard = [self._collect(pending, s) for s in range(self.num_shards)]
        fanout_done = time.perf_counter()
        distances, ids, offsets = [], [], []
        for shard, replies in enumerate(per_shard):
            for shard_d, shard_i in replies:
                if shard_d.shape != (pending.num_queries, pending.k) or shard_i.shape != shard_d.shape:
                    raise RuntimeError(f"shard {shard} (actor {self._describe(shard)}) failed: returned shape "
                                       f"{shard_d.shape}, expected {(pending.num_queries, pending.k)}")
                distances.append(shard_d)
                ids.append(shard_i)
                offsets.append(self.id_offsets[shard])
        # Several replies for one shard (hedging) carry the same ids: keep each id once.
        dedup = len(distances) > self.num_shards
        merged_d, merged_i = topk_merge(distances, ids, pending.k, metric=self.metric, id_offsets=offsets,
                                        sorted=True, dedup=dedup)
        from .retrieval import faiss_layout  # faiss's padding and tie order, as ShardedIndex returns them
        merged_d, merged_i = faiss_layout(merged_d, merged_i, self.metric)
        done = time.perf_counter()
        self.last_timing = {"total_s": done - pending.started, "fanout_s": fanout_done - pending.started,
                            "merge_s": done - fanout_done}
        return merged_d, merged_i

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        """Stop every shard actor (the Ray cluster itself is left running)."""
        for group in self._actors:
            for actor in group:
                try:
                    self._ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass
        self._dead = [[True] * len(group) for group in self._actors]

    def __enter__(self) -> "RayShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (f"RayShardedIndex(num_shards={self.num_shards}, replicas={self.replicas}, ntotal={self.ntotal}, "
                f"d={self.d}, metric={self.metric!r})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _as_float32_matrix(op: str, name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{op}: {name} must be a 2-D array (N x D), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)
