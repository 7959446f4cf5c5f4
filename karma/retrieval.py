"""Exact sharded retrieval: S faiss indexes over disjoint slices of the items, searched in parallel and merged
with ``karma_kernels.topk_merge``.

Each shard answers its own top-k; the merge keeps the global best k per query in a total order (ties by smaller
global id), then the results are laid out as faiss lays out its own (``faiss_layout``). What equals one unsharded
exact index over all items (checked against faiss 1.15's ``IndexFlatL2`` / ``IndexFlatIP`` in tests/test_retrieval.py):
  "l2"  everything: ids, distances, the order of tied distances (ascending id), which items tied at the k-th
        distance are kept (the smallest ids), and the padding (id -1, distance +FLT_MAX) when k > ntotal.
  "ip"  ids and distances wherever the k-th distance is not tied with an item left out; tied distances in
        descending id order, as IndexFlatIP returns them; padding id -1, distance -FLT_MAX. Not equal: which of
        several items tied exactly at the k-th distance are kept. IndexFlatIP's choice there depends on its scan
        (neither the smallest nor the largest ids), in one unsharded index as in each shard; the merge keeps the
        smallest ids among those the shards returned.
Distances are each item's own faiss distance (the same per-pair arithmetic as unsharded), so they are equal too. Global id = local id + the shard's id offset (default: the cumulative ``ntotal`` of the shards before
it, i.e. the row index for ``build``).

Two paths, chosen once when the index is made (``device="auto" | "cpu" | "cuda"``):
  cpu   CPU faiss shards searched in threads (faiss releases the GIL), merged by the C++ ``topk_merge``.
  cuda  faiss GPU Flat shards (one per device, or several on one), searched with torch CUDA tensors in and out
        (``faiss.contrib.torch_utils``, on torch's current stream); ids are offset and merged by the CUDA
        ``topk_merge`` on the device, with no host round trip and no host sync.
The rule (``why_not_gpu``): the cuda path runs when faiss has GPU support and sees a GPU, torch has CUDA, the
compiled ``topk_merge`` has its CUDA kernel, and every shard is a Flat index (exact: the cuda path must give the
cpu path's results); "auto" takes it when all hold and otherwise keeps the reasons in ``index.why_not_gpu``;
"cuda" raises them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from karma_kernels import topk_merge

METRICS = ("l2", "ip")
DEVICES = ("auto", "cpu", "cuda")
# Exact indexes the cuda path takes (CPU classes, copied to the GPU, and faiss's GPU classes).
GPU_FLAT_TYPES = ("IndexFlat", "IndexFlatL2", "IndexFlatIP", "GpuIndexFlat", "GpuIndexFlatL2", "GpuIndexFlatIP")
# faiss GPU's k-selection handles k <= 2048 per search.
GPU_MAX_K = 2048
INT64_MAX = 2**63 - 1
# faiss fills missing results (k > ntotal) with id -1 and this distance (+ for L2, - for IP): FLT_MAX, not inf.
FLT_MAX = float(np.finfo(np.float32).max)


def faiss_layout(distances, ids, metric: str):
    """``topk_merge``'s sorted rows laid out as a faiss exact index returns them (numpy arrays or torch tensors,
    no host sync): padding distances (id -1) become +FLT_MAX ("l2") / -FLT_MAX ("ip") instead of +-inf, and for
    "ip" every run of equal distances is put in descending id order (IndexFlatIP's order; for "l2" the merge's
    ascending order is already IndexFlatL2's). NaN distances are never equal, so they are left in place."""
    pad = FLT_MAX if metric == "l2" else -FLT_MAX
    if isinstance(distances, np.ndarray):
        distances = np.where(ids < 0, np.float32(pad), distances).astype(np.float32, copy=False)
        if metric == "ip" and distances.shape[1] > 1:
            run = np.cumsum(np.concatenate([np.zeros_like(ids[:, :1]), distances[:, 1:] != distances[:, :-1]],
                                           axis=1), axis=1)
            order = np.lexsort((-ids, run), axis=1)
            distances, ids = np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)
        return distances, ids
    import torch

    distances = torch.where(ids < 0, torch.full((), pad, dtype=distances.dtype, device=distances.device), distances)
    if metric == "ip" and distances.shape[1] > 1:
        starts = torch.cat([torch.zeros_like(ids[:, :1]), (distances[:, 1:] != distances[:, :-1]).long()], dim=1)
        run = starts.cumsum(dim=1)
        # descending id inside a run, runs kept in place: two stable sorts (id, then run index)
        order = torch.sort(-ids, dim=1, stable=True).indices
        order = order.gather(1, torch.sort(run.gather(1, order), dim=1, stable=True).indices)
        distances, ids = distances.gather(1, order), ids.gather(1, order)
    return distances, ids


def _import_faiss():
    try:
        import faiss
    except ImportError as error:  # depends on the environment
        raise ImportError("ShardedIndex needs faiss: pip install 'karma-kernels[faiss]' (or faiss-cpu)") from error
    return faiss


def _faiss_metric(faiss, metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _is_gpu_index(index) -> bool:
    return hasattr(index, "getDevice")


@dataclass(frozen=True)
class GpuFacts:
    """What the choice of search path depends on (``gpu_facts`` reads them from this machine)."""
    faiss_has_gpu: bool                # the faiss build has GPU support (faiss-gpu, not faiss-cpu)
    faiss_num_gpus: int                # faiss.get_num_gpus()
    torch_cuda: bool                   # torch.cuda.is_available()
    merge_has_cuda: bool               # the compiled topk_merge has its CUDA kernel
    shard_types: Tuple[str, ...] = ()  # class names of the shards' faiss indexes


def gpu_facts(shards: Sequence = ()) -> GpuFacts:
    """Reads the facts from faiss, torch and the compiled extension (no device query happens at import)."""
    import torch

    from karma_kernels.topk_merge import op as merge_op

    faiss = _import_faiss()
    has_gpu = hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "index_cpu_to_gpu")
    return GpuFacts(faiss_has_gpu=has_gpu, faiss_num_gpus=int(faiss.get_num_gpus()) if has_gpu else 0,
                    torch_cuda=bool(torch.cuda.is_available()),
                    merge_has_cuda=bool(merge_op._extension_loaded() and merge_op._compiled_supports("cuda")),
                    shard_types=tuple(type(shard).__name__ for shard in shards))


def gpu_unavailable_reasons(facts: GpuFacts) -> List[str]:
    """Every reason the cuda path cannot run, in the order a user fixes them; empty when it can."""
    reasons = []
    if not facts.faiss_has_gpu:
        reasons.append("faiss was built without GPU support (faiss-cpu); install faiss-gpu "
                       "(pip install 'karma-kernels[faiss-gpu]')")
    elif facts.faiss_num_gpus < 1:
        reasons.append("faiss sees no GPU (faiss.get_num_gpus() == 0)")
    if not facts.torch_cuda:
        reasons.append("torch has no CUDA device (torch.cuda.is_available() is False)")
    if not facts.merge_has_cuda:
        reasons.append("karma_kernels._C has no CUDA topk_merge kernel (build it with a CUDA torch: "
                       "pip install --no-build-isolation -e .)")
    others = sorted({name for name in facts.shard_types if name not in GPU_FLAT_TYPES})
    if others:
        reasons.append(f"the cuda path takes exact Flat indexes only, got {', '.join(others)} "
                       f"(their GPU versions would not give the cpu path's results)")
    return reasons


def why_not_gpu(shards: Sequence = ()) -> Optional[str]:
    """Why ``ShardedIndex`` over ``shards`` (Flat when empty) would not search on the GPU here; None when it
    would."""
    reasons = gpu_unavailable_reasons(gpu_facts(shards))
    return "; ".join(reasons) if reasons else None


class ShardedIndex:
    """S faiss indexes over disjoint item slices, searched as one.

    Args:
        shards: faiss indexes of one dimension and the metric ``metric`` (Flat, IVF, HNSW, ... any faiss index;
            faiss GPU Flat indexes too, which need ``device`` "auto" or "cuda").
        metric: "l2" (ascending squared distance) or "ip" (descending inner product).
        id_offsets: S integers added to each shard's local ids; default the cumulative ``ntotal`` of the shards
            before it. Pass zeros for shards that already return global ids (``IndexIDMap``).
        max_workers: threads that search the shards concurrently (default: one per shard; on the cuda path one
            per device).
        device: "auto" (the cuda path when ``why_not_gpu`` finds no reason against it, else cpu), "cpu", or
            "cuda" (raises ValueError with the reasons when the cuda path cannot run). See the module docstring.
        gpus: CUDA device ordinals for the cuda path; shard s goes to ``gpus[s % len(gpus)]`` (repeat an ordinal
            to put several shards on one device). Default: every GPU faiss sees. CPU shards are copied there.

    Attributes: ``device`` ("cpu" or "cuda": the path taken), ``why_not_gpu`` (why the cpu path was taken, or
    None), ``shard_devices`` (each shard's CUDA ordinal on the cuda path).
    """

    def __init__(self, shards: Sequence, *, metric: str = "l2", id_offsets: Optional[Sequence[int]] = None,
                 max_workers: Optional[int] = None, device: str = "auto", gpus: Optional[Sequence[int]] = None):
        faiss = _import_faiss()
        if metric not in METRICS:
            raise ValueError(f"ShardedIndex: metric must be one of {METRICS}, got {metric!r}")
        if device not in DEVICES:
            raise ValueError(f"ShardedIndex: device must be one of {DEVICES}, got {device!r}")
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
        on_gpu = [_is_gpu_index(shard) for shard in shards]
        if any(on_gpu) and not all(on_gpu):
            raise ValueError("ShardedIndex: shards mix faiss CPU and GPU indexes; pass CPU indexes (copied to "
                             "the GPUs on the cuda path) or GPU indexes only")
        if all(on_gpu) and device == "cpu":
            raise ValueError("ShardedIndex: device='cpu' but the shards are faiss GPU indexes "
                             "(faiss.index_gpu_to_cpu each one, or use device='auto')")
        if id_offsets is None:
            id_offsets = np.concatenate([[0], np.cumsum([shard.ntotal for shard in shards])[:-1]]).tolist()
        elif len(id_offsets) != len(shards):
            raise ValueError(f"ShardedIndex: id_offsets must have one entry per shard ({len(shards)}), got "
                             f"{len(id_offsets)}")
        if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int)
                                        or max_workers < 1):
            raise ValueError(f"ShardedIndex: max_workers must be an int >= 1 or None, got {max_workers!r}")
        self.metric = metric
        self.id_offsets = [int(offset) for offset in id_offsets]
        self.d = shards[0].d
        self.max_workers = max_workers or len(shards)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._gpu_resources: dict = {}
        self.shard_devices: List[int] = []

        self.why_not_gpu = "device='cpu' was requested" if device == "cpu" else why_not_gpu(shards)
        if device == "cuda" and self.why_not_gpu:
            raise ValueError(f"ShardedIndex: device='cuda' but the cuda path cannot run: {self.why_not_gpu}")
        self.device = "cpu" if self.why_not_gpu else "cuda"
        self.shards = self._to_gpus(faiss, shards, gpus) if self.device == "cuda" else shards

    def _to_gpus(self, faiss, shards: list, gpus: Optional[Sequence[int]]) -> list:
        """The cuda path's shards: GPU indexes stay where they are, CPU ones are copied to ``gpus``."""
        import faiss.contrib.torch_utils  # noqa: F401  (faiss's torch interop: GPU indexes take CUDA tensors)

        num_gpus = faiss.get_num_gpus()
        if gpus is None:
            gpus = list(range(num_gpus))
        gpus = list(gpus)
        if not gpus or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or not 0 <= g < num_gpus
                           for g in gpus):
            raise ValueError(f"ShardedIndex: gpus must be a non-empty list of device ordinals in [0, {num_gpus}), "
                             f"got {gpus!r}")
        for s, offset in enumerate(self.id_offsets):
            # Flat ids are 0..ntotal-1: offsets are applied on the device, so they are checked here, once.
            if offset < 0 or offset + shards[s].ntotal - 1 > INT64_MAX:
                raise ValueError(f"ShardedIndex: id_offsets[{s}] = {offset} puts shard {s}'s ids outside "
                                 f"[0, 2^63-1] (the cuda path needs offsets >= 0)")
        placed = []
        for s, shard in enumerate(shards):
            if _is_gpu_index(shard):
                placed.append(shard)
                self.shard_devices.append(int(shard.getDevice()))
                continue
            ordinal = int(gpus[s % len(gpus)])
            if ordinal not in self._gpu_resources:  # one resource object (streams, scratch memory) per device
                self._gpu_resources[ordinal] = faiss.StandardGpuResources()
            placed.append(faiss.index_cpu_to_gpu(self._gpu_resources[ordinal], ordinal, shard))
            self.shard_devices.append(ordinal)
        return placed

    @classmethod
    def build(cls, vectors: np.ndarray, num_shards: int, *, metric: str = "l2", factory: str = "Flat",
              train: bool = True, max_workers: Optional[int] = None, device: str = "auto",
              gpus: Optional[Sequence[int]] = None) -> "ShardedIndex":
        """Split ``vectors`` (N, D) into ``num_shards`` contiguous disjoint row slices, one faiss index each
        (``faiss.index_factory(D, factory, metric)``, trained on its own slice when ``train`` and untrained);
        the global id of an item is its row index. ``vectors`` may be a numpy array or a torch tensor (any
        device). ``device`` and ``gpus`` as in the constructor (the shards are built on the CPU, then copied to
        the GPUs on the cuda path)."""
        faiss = _import_faiss()
        if metric not in METRICS:
            raise ValueError(f"ShardedIndex.build: metric must be one of {METRICS}, got {metric!r}")
        if hasattr(vectors, "detach") and hasattr(vectors, "cpu"):  # a torch tensor: faiss builds from host memory
            vectors = vectors.detach().cpu().numpy()
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
        return cls(shards, metric=metric, max_workers=max_workers, device=device, gpus=gpus)

    @property
    def ntotal(self) -> int:
        return int(sum(shard.ntotal for shard in self.shards))

    def _search_shard(self, shard, queries: np.ndarray, k: int):
        width = min(k, shard.ntotal)
        if width == 0:  # an empty shard contributes nothing
            return (np.empty((queries.shape[0], 0), np.float32), np.empty((queries.shape[0], 0), np.int64))
        return shard.search(queries, width)

    def _map(self, fn, items: list, workers: int) -> list:
        if len(items) == 1 or workers == 1:
            return [fn(item) for item in items]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="karma-shard-search")
        return list(self._executor.map(fn, items))

    def search(self, queries, k: int):
        """Top-``k`` of every query over all shards: (Q, k) float32 distances and int64 global ids, best first;
        id -1 with +FLT_MAX ("l2") / -FLT_MAX ("ip") where fewer than k items exist, as faiss pads. Ties as
        one exact faiss index orders them (see the module docstring for what equals it exactly).

        ``queries`` (Q, D): a numpy array (results are numpy) or a torch tensor (results are torch tensors on
        the queries' device). On the cuda path CUDA queries never leave the device and nothing syncs the host.
        """
        import torch

        is_tensor = isinstance(queries, torch.Tensor)
        shape = tuple(queries.shape) if is_tensor else np.shape(queries)
        if len(shape) != 2 or shape[1] != self.d:
            raise ValueError(f"ShardedIndex.search: queries must be 2-D (Q, {self.d}), got shape {shape}")
        floating = queries.is_floating_point() if is_tensor else np.issubdtype(np.asarray(queries).dtype, np.floating)
        if not floating:
            raise TypeError(f"ShardedIndex.search: queries must be floating, got {queries.dtype}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ShardedIndex.search: k must be an int >= 1, got {k!r}")
        k = int(k)
        if self.device == "cuda":
            return self._search_cuda(queries, k)
        host = queries.detach().cpu().numpy() if is_tensor else queries
        host = np.ascontiguousarray(host, dtype=np.float32)
        results = self._map(lambda shard: self._search_shard(shard, host, k), self.shards, self.max_workers)
        # faiss returns rows sorted best-first, padded with -1: the k-way merge reads about k + S per query.
        distances, ids = topk_merge([r[0] for r in results], [r[1] for r in results], k, metric=self.metric,
                                    id_offsets=self.id_offsets, sorted=True)
        distances, ids = faiss_layout(distances, ids, self.metric)
        if is_tensor:
            return torch.from_numpy(distances).to(queries.device), torch.from_numpy(ids).to(queries.device)
        return distances, ids

    def _search_cuda(self, queries, k: int):
        import torch

        if k > GPU_MAX_K:
            raise ValueError(f"ShardedIndex.search: k = {k} exceeds faiss GPU's k-selection limit {GPU_MAX_K} "
                             f"(build the index with device='cpu' for larger k)")
        is_tensor = isinstance(queries, torch.Tensor)
        if is_tensor and queries.is_cuda:
            merge_device = queries.device
        else:
            merge_device = torch.device("cuda", self.shard_devices[0])
        source = queries.detach() if is_tensor else torch.from_numpy(np.ascontiguousarray(queries))
        devices = list(dict.fromkeys(self.shard_devices))

        def search_device(ordinal: int) -> list:
            """The shards on one device, in order on torch's current stream there (faiss follows it)."""
            device = torch.device("cuda", ordinal)
            with torch.cuda.device(device):
                local = source.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
                found = []
                for s, shard in enumerate(self.shards):
                    if self.shard_devices[s] != ordinal:
                        continue
                    width = min(k, shard.ntotal)
                    if width == 0:  # an empty shard contributes nothing
                        found.append((s, torch.empty((local.shape[0], 0), device=merge_device),
                                      torch.empty((local.shape[0], 0), dtype=torch.int64, device=merge_device)))
                        continue
                    distances, ids = shard.search(local, width)
                    if self.id_offsets[s]:
                        # Global ids on the device; padding (-1) stays -1. Offsets were bounds-checked when the
                        # index was made, so the merge need not read an overflow flag back (a host sync).
                        ids = torch.where(ids >= 0, ids + self.id_offsets[s], ids)
                    found.append((s, distances.to(merge_device, non_blocking=True),
                                  ids.to(merge_device, non_blocking=True)))
                return found

        per_device = self._map(search_device, devices, min(self.max_workers, len(devices)))
        results = sorted((item for found in per_device for item in found), key=lambda item: item[0])
        with torch.cuda.device(merge_device):
            distances, ids = topk_merge([r[1] for r in results], [r[2] for r in results], k, metric=self.metric,
                                        sorted=True)
            distances, ids = faiss_layout(distances, ids, self.metric)
        if is_tensor:
            return distances.to(queries.device), ids.to(queries.device)
        return distances.cpu().numpy(), ids.cpu().numpy()

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
