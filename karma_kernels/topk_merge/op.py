"""``topk_merge``: the global best k of S shards' top-k search results.

The work is done by the compiled op ``torch.ops.karma.topk_merge`` (``csrc/``; CPU always, CUDA when built with
it). The extension is loaded on the first call, not at import; when it is missing, a RuntimeWarning says how to
build it and the numpy reference (``reference.py``) answers instead.
"""
from __future__ import annotations

import importlib
import numbers
import threading
import warnings
from typing import Optional, Union

import numpy as np
import torch

from .._validation import check_choice
from .reference import check_rows_sorted, topk_merge_reference

OP = "topk_merge"
METRICS = ("l2", "ip")
BACKENDS = ("auto", "compiled", "reference", "device_emulation")
DISTANCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BUILD_HINT = "pip install --no-build-isolation -e ."
MAX_K = 2**31 - 1  # results per query at most
MAX_PADDED_OUTPUT = 2**31  # entries of a (Q, k) output at most when k exceeds the candidates per query

ArrayLike = Union[np.ndarray, torch.Tensor]

_load_lock = threading.Lock()
_extension_state: dict = {}  # "loaded": bool, set once by _extension_loaded()
_merge_small = None  # karma_kernels._C.merge_small once the extension is loaded (the small-call path)
_is_compiling = torch.compiler.is_compiling
_SMALL_CALL_TYPES = (np.ndarray, list, tuple)  # what the small-call path may take as distances
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled


def _register_fake() -> None:
    def fake(distances, ids, k, largest, id_offsets, sorted, dedup):
        stacked = len(distances) == 1 and distances[0].dim() == 3  # one (S, Q, k_s) tensor
        num_queries = distances[0].shape[1 if stacked else 0]
        return (distances[0].new_empty((num_queries, k)),
                ids[0].new_empty((num_queries, k)))

    for name in ("karma::topk_merge", "karma::topk_merge_warp_emulated"):
        torch.library.register_fake(name)(fake)


# Run eagerly even under torch.compile: Dynamo calls these at trace time and keeps their answer as a constant
# (it cannot trace a lock or an import), so topk_merge compiles with fullgraph=True on its first call too.
@torch.compiler.assume_constant_result
def _extension_loaded() -> bool:
    """Imports karma_kernels._C once; warns once when it is not built."""
    global _merge_small
    with _load_lock:
        if "loaded" not in _extension_state:
            try:
                module = importlib.import_module("karma_kernels._C")
                _register_fake()
                _extension_state["loaded"] = True
                _merge_small = getattr(module, "merge_small", None)
            except ImportError as error:
                _extension_state["loaded"] = False
                warnings.warn(
                    f"karma_kernels._C is not built ({error}); topk_merge falls back to the slow numpy reference. "
                    f"Build the extension with `{BUILD_HINT}` from the repository root.",
                    RuntimeWarning, stacklevel=3)
        return _extension_state["loaded"]


_kernel_for_device: dict = {}  # device type -> whether the op has a kernel for it


@torch.compiler.assume_constant_result
def _compiled_supports(device_type: str) -> bool:
    if device_type == "meta":  # shape inference: the op's fake kernel (registered with the extension) answers
        return True
    if device_type not in _kernel_for_device:
        _kernel_for_device[device_type] = torch._C._dispatch_has_kernel_for_dispatch_key(
            "karma::topk_merge", device_type.upper())
    return _kernel_for_device[device_type]


def _library_of(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        return "torch"
    if isinstance(value, np.ndarray):
        return "numpy"
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{OP}: {name} must hold at least one shard, got an empty {type(value).__name__}")
        libraries = {_library_of(f"{name}[{s}]", v) for s, v in enumerate(value)}
        if len(libraries) > 1:
            raise TypeError(f"{OP}: {name} mixes numpy arrays and torch tensors; use one library")
        return libraries.pop()
    raise TypeError(f"{OP}: {name} must be a numpy array, a torch tensor, or a list of them (one per shard), "
                    f"got {type(value).__name__}")


def _as_tensor(name: str, array: ArrayLike) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    if array.dtype.kind not in "biufc" or array.dtype == np.longdouble:  # which torch has no dtype for
        raise TypeError(f"{OP}: {name} must be float32, float16, bfloat16 or float64 (distances) / int64 (ids), "
                        f"got numpy {array.dtype}")
    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # read only here; torch warns about any non-writable array
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)
    return torch.from_numpy(array)


def _shards(name: str, value) -> Union[torch.Tensor, list[torch.Tensor]]:
    """(S, Q, k_s) -> that tensor (stacked; no copy, no tensor per shard), a list of S (Q, k_s) -> S tensors."""
    if isinstance(value, (list, tuple)):
        shards = [_as_tensor(f"{name}[{s}]", v) for s, v in enumerate(value)]
        for s, shard in enumerate(shards):
            if shard.dim() != 2:
                raise ValueError(f"{OP}: {name}[{s}] must be 2-D (Q, k_s), got shape {tuple(shard.shape)}")
        return shards
    stacked = _as_tensor(name, value)
    if stacked.dim() != 3:
        raise ValueError(f"{OP}: {name} must be 3-D (S, Q, k_s) or a list of 2-D (Q, k_s) arrays, "
                         f"got shape {tuple(stacked.shape)}")
    if stacked.shape[0] == 0:
        raise ValueError(f"{OP}: {name} must hold at least one shard, got shape {tuple(stacked.shape)}")
    return stacked


def _shard_list(shards: Union[torch.Tensor, list[torch.Tensor]]) -> list[torch.Tensor]:
    return list(shards.unbind(0)) if isinstance(shards, torch.Tensor) else shards


def _op_list(shards: Union[torch.Tensor, list[torch.Tensor]]) -> list[torch.Tensor]:
    """The compiled op's Tensor[] argument: a stacked input goes whole, as a one-element list."""
    return [shards] if isinstance(shards, torch.Tensor) else shards


def _offsets_tensor(id_offsets, num_shards: int, device: torch.device) -> Optional[torch.Tensor]:
    if id_offsets is None:
        return None
    if isinstance(id_offsets, torch.Tensor):
        offsets = id_offsets
    elif isinstance(id_offsets, np.ndarray):
        if not np.issubdtype(id_offsets.dtype, np.integer):
            raise TypeError(f"{OP}: id_offsets must hold integers, got {id_offsets.dtype}")
        if id_offsets.size and id_offsets.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{OP}: id_offsets must fit in int64, got {id_offsets.max()}")
        offsets = torch.from_numpy(id_offsets.astype(np.int64))
    elif isinstance(id_offsets, (list, tuple)):
        for s, value in enumerate(id_offsets):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{OP}: id_offsets must hold integers, id_offsets[{s}] is {value!r}")
            if not -2**63 <= int(value) < 2**63:
                raise ValueError(f"{OP}: id_offsets[{s}] = {value} does not fit in int64")
        offsets = torch.tensor([int(v) for v in id_offsets], dtype=torch.int64)
    else:
        raise TypeError(f"{OP}: id_offsets must be a list of ints, an integer array or tensor, or None, "
                        f"got {type(id_offsets).__name__}")
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise TypeError(f"{OP}: id_offsets must hold integers, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] != num_shards:
        raise ValueError(f"{OP}: id_offsets must have one entry per shard, shape ({num_shards},), "
                         f"got shape {tuple(offsets.shape)}")
    return offsets.to(device=device, dtype=torch.int64).contiguous()


def _validate(distances: Union[torch.Tensor, list[torch.Tensor]], ids: Union[torch.Tensor, list[torch.Tensor]],
              k) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{OP}: k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"{OP}: k must be >= 1, got {k}")
    if k > MAX_K:
        raise ValueError(f"{OP}: k must be <= 2^31-1, got {k}")
    if isinstance(distances, torch.Tensor):  # stacked: one check for every shard
        if ids.shape[0] != distances.shape[0]:
            raise ValueError(f"{OP}: distances has {distances.shape[0]} shards but ids has {ids.shape[0]}")
        _validate_shard(distances, ids, "", distances.dtype, distances.device, distances.shape[1])
        return
    if len(distances) != len(ids):
        raise ValueError(f"{OP}: distances has {len(distances)} shards but ids has {len(ids)}")
    for s, (d, i) in enumerate(zip(distances, ids)):
        _validate_shard(d, i, f"[{s}]", distances[0].dtype, distances[0].device, distances[0].shape[0])


def _check_padding_size(distances: Union[torch.Tensor, list[torch.Tensor]], k: int) -> None:
    """k may exceed the candidates per query (the rows end with padding), but not into an output of more than
    2^31 entries that is mostly padding: that is a wrong k, not a request for a huge padded result."""
    if isinstance(distances, torch.Tensor):
        num_queries, candidates = distances.shape[1], distances.shape[0] * distances.shape[2]
    else:
        num_queries, candidates = distances[0].shape[0], sum(d.shape[1] for d in distances)
    if k > candidates and num_queries * k > MAX_PADDED_OUTPUT:
        raise ValueError(f"{OP}: k = {k} exceeds the {candidates} candidates per query, and the ({num_queries}, "
                         f"k) output would hold {num_queries * k} entries, mostly padding (more than 2^31); "
                         "pass a k of at most the candidates per query")


def _validate_shard(d: torch.Tensor, i: torch.Tensor, index: str, dtype, device, num_queries: int) -> None:
    """Checks one shard (index "[s]") or a stacked input (index "") against the first shard's dtype, device
    and number of queries."""
    for name, tensor in (("distances", d), ("ids", i)):
        if tensor.layout != torch.strided:
            raise TypeError(f"{OP}: {name}{index} must be a dense (strided) tensor, got layout {tensor.layout}; "
                            "call .to_dense() first")
    if d.dtype not in DISTANCE_DTYPES:
        raise TypeError(f"{OP}: distances{index} must be float32, float16, bfloat16 or float64, got {d.dtype}")
    if d.dtype != dtype:
        raise TypeError(f"{OP}: distances{index} is {d.dtype} but distances[0] is {dtype}; use one dtype")
    if i.dtype != torch.int64:
        raise TypeError(f"{OP}: ids{index} must be int64, got {i.dtype}")
    if tuple(i.shape) != tuple(d.shape):
        raise ValueError(f"{OP}: ids{index} has shape {tuple(i.shape)} but distances{index} has shape "
                         f"{tuple(d.shape)}")
    if d.shape[-2] != num_queries:
        raise ValueError(f"{OP}: every shard must have the same number of queries; distances{index} has "
                         f"{d.shape[-2]}, distances[0] has {num_queries}")
    if d.device != device or i.device != device:
        raise ValueError(f"{OP}: distances{index} and ids{index} must be on {device} like distances[0], got "
                         f"{d.device} and {i.device}")


def _reference(distances: list[torch.Tensor], ids: list[torch.Tensor], k: int, largest: bool,
               offsets: Optional[torch.Tensor], sorted: bool, dedup: bool) -> tuple[torch.Tensor, torch.Tensor]:
    host_distances = [d.detach().cpu().to(torch.float64).numpy() for d in distances]
    host_ids = [i.cpu().numpy() for i in ids]
    if sorted:  # the contract the compiled CPU op checks, checked alike: the backends raise on the same inputs
        check_rows_sorted(host_distances, host_ids, largest)
    out_distances, out_ids = topk_merge_reference(
        host_distances, host_ids, k,
        largest=largest, id_offsets=None if offsets is None else offsets.cpu().tolist(), dedup=dedup)
    device = distances[0].device
    return (torch.from_numpy(out_distances).to(device=device, dtype=distances[0].dtype),
            torch.from_numpy(out_ids).to(device))


def topk_merge(distances, ids, k: int, *, metric: str = "l2", id_offsets=None, sorted: bool = True,
               dedup: bool = False, backend: str = "auto"):
    """Merge per-shard top-k search results into the global top-k of each query.

    Args:
        distances: (S, Q, k_s) array, or a list of S (Q, k_s) arrays whose k_s may differ; numpy or torch
            (CPU, or CUDA when the extension was built with CUDA). float32, float16, bfloat16 or float64.
        ids: int64, same shapes as ``distances``. Any negative id is padding (an empty slot): it is never
            offset and never outranks a real result, wherever it appears in a row.
        k: results per query, 1 <= k <= 2^31-1; it may exceed the number of candidates (the rows then end
            with padding), as long as such a padded (Q, k) output holds at most 2^31 entries (ValueError).
        metric: "l2" (ascending distance) or "ip" (descending score).
        id_offsets: S integers added to each shard's local ids (e.g. the shard's first global row). A global
            id outside [0, 2^63-1] raises ValueError (never wraps).
        sorted: True when every shard row is sorted best-first by distance (faiss output; ties in any id
            order; NaN last; padding may sit anywhere): a k-way merge reads about k+S candidates per query.
            On the CPU ("compiled", "reference", the small-call path) every row is checked whole (a pass
            over the distances, the ids read again only for a row that fails it; about the cost of the merge's
            own reads, see docs/topk_merge_gpu.md) and a row out of order anywhere raises ValueError naming the
            shard and query, so no backend returns a wrong top-k silently. On CUDA (and "device_emulation")
            only the candidates the merge reads are checked against their row neighbours: a disorder past
            them goes unseen there. False accepts any order.
        dedup: keep only the best occurrence of each global id (replicated shards).
        backend: "auto" (the compiled op, else the reference with a warning), "compiled", "reference", or
            "device_emulation": the CUDA kernel's warp algorithm run on the CPU, 32 lanes in lockstep (the op
            karma::topk_merge_warp_emulated; slow, for tests of the GPU path where there is no GPU).

    Returns:
        (distances, ids) of shape (Q, k), same library and device as the inputs; distances keep the input
        dtype (values are selected, never computed, so a float16 input returns its exact float16 values; the
        comparisons run in float32, float64 for float64). Order: best first, a total order — NaN after every
        number, equal distances by smaller global id — so results never depend on shard order or thread
        count. Rows with fewer than k real candidates end with id -1 and +inf ("l2") / -inf ("ip").
        Not differentiable.
    """
    # The small-call path, first: numpy rows (stacked, or a list for a small call) merged straight from their memory
    # (csrc/topk_merge_numpy.cpp), which checks every argument itself (the same checks as below) and answers None for
    # anything it does not take or that is an error to raise; the general path below then handles the call.
    # Tensors, Python checks and the dispatcher cost more than merging one query; a stacked pair of plain CPU
    # tensors takes the path too (tensors out), unless a Python mode is active: the mode must then see the op. (Not
    # under torch.compile, and asked before the global is read: Dynamo cannot guard on a C function.)
    kind = type(distances)
    if (not _is_compiling() and _merge_small is not None
            and (kind in _SMALL_CALL_TYPES
                 or (kind is torch.Tensor and not (_dispatch_modes() or _function_modes())))):
        out = _merge_small(distances, ids, k, metric, id_offsets, sorted, dedup, backend)
        if out is not None:
            return out
    library = _library_of("distances", distances)
    if _library_of("ids", ids) != library:
        raise TypeError(f"{OP}: distances is {library} but ids is {_library_of('ids', ids)}; use one library")
    check_choice(OP, "metric", metric, METRICS)
    check_choice(OP, "backend", backend, BACKENDS)
    for name, flag in (("sorted", sorted), ("dedup", dedup)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{OP}: {name} must be a bool, got {type(flag).__name__}")
    distance_shards = _shards("distances", distances)
    id_shards = _shards("ids", ids)
    if isinstance(distance_shards, torch.Tensor) != isinstance(id_shards, torch.Tensor):
        distance_shards, id_shards = _shard_list(distance_shards), _shard_list(id_shards)  # one stacked, one list
    _validate(distance_shards, id_shards, k)
    k = int(k)
    num_shards = len(distance_shards)  # a stacked tensor's first dimension
    _check_padding_size(distance_shards, k)
    device = distance_shards[0].device
    offsets = _offsets_tensor(id_offsets, num_shards, device)
    largest = metric == "ip"

    if backend == "device_emulation":
        if not _extension_loaded() or device.type != "cpu":
            raise ValueError(f"{OP}: backend='device_emulation' needs the built extension and CPU inputs, got "
                             f"{device} (extension built: {bool(_extension_state.get('loaded'))})")
        out_distances, out_ids = torch.ops.karma.topk_merge_warp_emulated(
            [d.detach() for d in _op_list(distance_shards)], _op_list(id_shards), k, largest, offsets,
            bool(sorted), bool(dedup))
        return (out_distances.numpy(), out_ids.numpy()) if library == "numpy" else (out_distances, out_ids)
    use_compiled = backend != "reference" and _extension_loaded() and _compiled_supports(device.type)
    if backend == "compiled" and not use_compiled:
        why = (f"the extension has no {device.type} kernel (was it built with CUDA?)"
               if _extension_state.get("loaded") else f"the extension is not built ({BUILD_HINT})")
        raise ValueError(f"{OP}: backend='compiled' cannot run on {device}: {why}")
    if use_compiled:
        out_distances, out_ids = torch.ops.karma.topk_merge(
            [d.detach() if d.requires_grad else d for d in _op_list(distance_shards)], _op_list(id_shards), k,
            largest, offsets, bool(sorted), bool(dedup))
    else:
        out_distances, out_ids = _reference(_shard_list(distance_shards), _shard_list(id_shards), k, largest,
                                            offsets, bool(sorted), bool(dedup))
    if library == "numpy":
        return out_distances.numpy(), out_ids.numpy()
    return out_distances, out_ids
