"""Cross-rank in-batch negatives: every query sees every rank's keys.

``gather_keys`` all-gathers the keys (and their ``key_ids`` and ``logq``) of every rank in a process group with
an autograd-aware all-gather; ``distributed_contrastive_loss`` calls ``contrastive_loss`` on the local queries
against the gathered keys, with targets shifted by ``offset`` (the number of keys held by lower ranks).

Gradients. The backward of the gather all-reduces (SUM) the gradient of the gathered keys over the group and
returns this rank's slice, so each key's gradient collects the contributions of every rank's queries. All-reduce
works on gloo and nccl (reduce-scatter does not on gloo). Every rank must run the backward (it is a collective).

Reduction scaling, with L_r the loss returned on rank r and L the single-process loss on the concatenated batch
(queries and keys concatenated in rank order):
  * ``reduction="sum"``: sum_r L_r == L. Query gradients equal dL/dq on each rank; key gradients equal dL/dk
    after the backward all-reduce; a shared parameter's gradient (e.g. a learnable temperature) summed over
    ranks equals dL/dparam.
  * ``reduction="mean"``: L_r is rank r's mean over its own queries. With equal per-rank query counts the mean
    of L_r over ranks is the global mean, and DDP's gradient averaging (it divides the all-reduced gradient by
    the world size) yields exactly the gradient of the global mean. With unequal counts use "sum" and divide
    by the global query count yourself.
  * ``reduction="none"``: per-query losses of the local queries, each equal to the matching row of the
    single-process result.

``symmetric=True`` (softmax, M_r == B_r on every rank, target=None) also all-gathers the queries: the
query->key half of loss_i is local query i against every rank's keys, the key->query half is local key i against
every rank's queries (the softmax of column i of the global logit matrix; logq cancels in it), and each rank
returns (row_i + col_i) / 2 for its own i, reduced as above. Query gradients then also flow back across ranks.
Both modes ("softmax", "pairwise") work.

Gathering unequal key counts costs one small all-gather of the counts and a host sync (the buffer sizes must be
known on the host); pass ``key_counts`` when every rank already knows them to skip it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .._validation import check_same_device, check_tensor

_OP = "gather_keys"


def _world_of(process_group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)


def _gather_counts(local_count: int, device: torch.device, process_group, world: int) -> List[int]:
    local = torch.tensor([local_count], dtype=torch.int64, device=device)
    counts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(counts, local, group=process_group)
    # The sizes must live on the host (every rank allocates its receive buffers from them): one sync.
    return torch.cat(counts).tolist()


def _comm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # gloo has no bfloat16/float16 reductions on every build; send them as float32 on CPU (exact round trip).
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def _all_gather_rows(x: torch.Tensor, counts: Sequence[int], process_group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (row counts may differ: pad to the largest, then trim)."""
    world = len(counts)
    largest = max(counts)
    send = x.to(_comm_dtype(x.dtype, x.device)).contiguous()
    if send.shape[0] < largest:
        send = torch.cat([send, send.new_zeros((largest - send.shape[0],) + tuple(send.shape[1:]))])
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=process_group)
    return torch.cat([part[:n] for part, n in zip(received, counts)]).to(x.dtype)


class _AllGatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gathered gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, counts, rank, process_group):
        ctx.counts = list(counts)
        ctx.rank = rank
        ctx.process_group = process_group
        return _all_gather_rows(x, counts, process_group)

    @staticmethod
    def backward(ctx, grad_gathered):
        # all_reduce works in place: never write into a gradient buffer autograd may share.
        comm = _comm_dtype(grad_gathered.dtype, grad_gathered.device)
        grad = grad_gathered.to(comm, copy=True).contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.process_group)
        start = sum(ctx.counts[:ctx.rank])
        local = grad[start:start + ctx.counts[ctx.rank]].to(grad_gathered.dtype)
        return local, None, None, None


def all_gather_rows(x: torch.Tensor, *, process_group=None, counts: Optional[Sequence[int]] = None
                    ) -> Tuple[torch.Tensor, int]:
    """Concatenate ``x`` of every rank along dim 0 in rank order; differentiable when ``x`` requires grad.

    Returns ``(gathered, offset)`` where ``offset`` is the number of rows on lower ranks.
    """
    world = _world_of(process_group)
    if world == 1:
        return x, 0
    rank = dist.get_rank(process_group)
    if counts is None:
        counts = _gather_counts(x.shape[0], x.device, process_group, world)
    else:
        counts = [int(c) for c in counts]
        if len(counts) != world or counts[rank] != x.shape[0]:
            raise ValueError(f"{_OP}: key_counts must list every rank's row count ({world} entries, entry "
                             f"{rank} = {x.shape[0]}), got {counts}")
    offset = sum(counts[:rank])
    if x.requires_grad and torch.is_grad_enabled():
        return _AllGatherRows.apply(x, counts, rank, process_group), offset
    return _all_gather_rows(x, counts, process_group), offset


def gather_keys(keys: torch.Tensor, key_ids: Optional[torch.Tensor] = None, logq: Optional[torch.Tensor] = None,
                *, process_group=None, key_counts: Optional[Sequence[int]] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """All-gather ``keys`` (M_r x D on rank r), ``key_ids`` (M_r) and ``logq`` (M_r) over ``process_group``.

    Returns ``(all_keys, all_key_ids, all_logq, offset)``: rows in rank order, ``offset`` = sum of M over lower
    ranks, so a local target t becomes t + offset. Gradients of ``all_keys`` flow back to the owning rank (summed
    over every rank's loss). Without an initialised process group (or with one rank) the inputs come back as
    they are with offset 0. ``key_counts`` (every rank's M, in rank order) skips the count exchange.
    """
    check_tensor(_OP, "keys", keys, ndim=2, floating=True)
    if key_ids is not None:
        check_tensor(_OP, "key_ids", key_ids, ndim=1, integer=True)
        if key_ids.shape[0] != keys.shape[0]:
            raise ValueError(f"{_OP}: key_ids must have one entry per key ({keys.shape[0]}), "
                             f"got shape {tuple(key_ids.shape)}")
    if logq is not None:
        check_tensor(_OP, "logq", logq, ndim=1, floating=True)
        if logq.shape[0] != keys.shape[0]:
            raise ValueError(f"{_OP}: logq must have one entry per key ({keys.shape[0]}), "
                             f"got shape {tuple(logq.shape)}")
    check_same_device(_OP, keys=keys, key_ids=key_ids, logq=logq)
    world = _world_of(process_group)
    if world == 1:
        return keys, key_ids, logq, 0
    if key_counts is None:
        key_counts = _gather_counts(keys.shape[0], keys.device, process_group, world)
    all_keys, offset = all_gather_rows(keys, process_group=process_group, counts=key_counts)
    all_key_ids = None if key_ids is None else all_gather_rows(key_ids, process_group=process_group,
                                                               counts=key_counts)[0]
    all_logq = None if logq is None else all_gather_rows(logq, process_group=process_group,
                                                         counts=key_counts)[0]
    return all_keys, all_key_ids, all_logq, offset


def distributed_contrastive_loss(query: torch.Tensor, keys: torch.Tensor, target: Optional[torch.Tensor] = None,
                                 *, process_group=None, key_ids: Optional[torch.Tensor] = None,
                                 logq: Optional[torch.Tensor] = None, key_counts: Optional[Sequence[int]] = None,
                                 **kwargs) -> torch.Tensor:
    """``contrastive_loss`` of the local queries against the keys of every rank in ``process_group``.

    ``process_group=None`` here means the default group (unlike ``contrastive_loss``, where None means no
    gathering); without an initialised group, or with one rank, this is a plain ``contrastive_loss`` call.

    ``target`` indexes the local ``keys`` (None: query i's positive is local key i); it is shifted by the
    gathered offset. Other keyword arguments go to
    ``karma_kernels.contrastive_loss`` unchanged; see the module docstring for how ``reduction`` scales.
    """
    # Imported here: op.py delegates to this module for process_group=..., so a top-level import would cycle.
    from .op import contrastive_loss

    op = "distributed_contrastive_loss"
    check_tensor(op, "query", query, ndim=2, floating=True)
    check_tensor(op, "keys", keys, ndim=2, floating=True)
    if target is not None:
        check_tensor(op, "target", target, ndim=1, integer=True)
    world = _world_of(process_group)
    if world == 1:
        return contrastive_loss(query, keys, target, key_ids=key_ids, logq=logq, **kwargs)
    if kwargs.get("symmetric", False):
        return _symmetric_loss(op, query, keys, target, key_ids, logq, key_counts, process_group, kwargs,
                               contrastive_loss)
    all_keys, all_key_ids, all_logq, offset = gather_keys(keys, key_ids, logq, process_group=process_group,
                                                          key_counts=key_counts)
    if target is None:
        if query.shape[0] > keys.shape[0]:
            raise ValueError(f"{op}: target=None pairs query i with local key i, so keys needs at least "
                             f"{query.shape[0]} rows on this rank, got {keys.shape[0]}")
        target = torch.arange(query.shape[0], device=query.device)
    return contrastive_loss(query, all_keys, target + offset, key_ids=all_key_ids, logq=all_logq, **kwargs)


def _symmetric_loss(op, query, keys, target, key_ids, logq, key_counts, process_group, kwargs, contrastive_loss):
    """CLIP-style loss across ranks: (local rows against all keys + local columns against all queries) / 2."""
    mode = kwargs.get("mode", "softmax")
    if mode != "softmax":
        raise ValueError(f"{op}: symmetric=True needs mode='softmax', got mode={mode!r}")
    if target is not None:
        raise ValueError(f"{op}: symmetric=True pairs query i with key i; pass target=None")
    if query.shape[0] != keys.shape[0]:
        raise ValueError(f"{op}: symmetric=True needs as many keys as queries on every rank, got "
                         f"B={query.shape[0]}, M={keys.shape[0]} on this rank")
    reduction = kwargs.get("reduction", "mean")
    per_row = dict(kwargs, symmetric=False, reduction="none")
    # B_r == M_r on every rank, so the queries share the keys' counts and offset.
    counts = key_counts
    if counts is None:
        counts = _gather_counts(keys.shape[0], keys.device, process_group, _world_of(process_group))
    all_keys, all_key_ids, all_logq, offset = gather_keys(keys, key_ids, logq, process_group=process_group,
                                                          key_counts=counts)
    all_queries, _ = all_gather_rows(query, process_group=process_group, counts=counts)
    own = torch.arange(query.shape[0], device=query.device) + offset
    row_loss = contrastive_loss(query, all_keys, own, key_ids=all_key_ids, logq=all_logq, **per_row)
    # Column i of the global logit matrix: key i against every query; positives are aligned (query r <-> key r),
    # so the queries carry the keys' ids, and logq_i, common to the whole column, cancels.
    column_loss = contrastive_loss(keys, all_queries, own, key_ids=all_key_ids, logq=None, **per_row)
    loss = (row_loss + column_loss) / 2
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
