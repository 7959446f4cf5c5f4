"""Vocabulary-parallel linear + cross-entropy (``linear_cross_entropy(..., process_group=group)``).

Each rank of ``group`` holds rows [rank V_r, (rank + 1) V_r) of the LM head (equal shards); ``hidden`` and the
global ``target`` are the same on every rank. Per rank, the op computes on its shard (no [N, V] logits anywhere):
lse_r (the log-sum-exp over its classes) for every token, and ce_r = lse_r - z_t for the tokens whose target is
in the shard. Across the group (one all-gather of lse_r [N], one all-reduce of [2, N]):

    lse_n  = logsumexp_r lse_rn
    ce_n   = ce_{r*} + log sum_r exp(lse_rn - lse_{r* n})      (r* the rank holding t_n; = lse_n - z_t, exactly)

Backward (no communication for the shard's own gradients): d ce/d lse_r = softmax_r(lse) - [r = r*], d ce/d ce_r =
[r = r*], d lse/d lse_r = softmax_r(lse); the local op turns these into the shard's weight/bias gradients and a
partial hidden gradient, which is all-reduced (``_CopyToGroup``) so every rank gets the full hidden gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def check_process_group(op: str, group, weight: torch.Tensor, *, label_smoothing, ce_weight,
                        return_token_accuracy) -> int:
    """Checks ``process_group`` and the options it supports; returns the global vocabulary size."""
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: process_group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"{op}: process_group needs an initialised torch.distributed (init_process_group)")
    for name, refused in (("label_smoothing > 0", bool(label_smoothing)), ("ce_weight", ce_weight is not None),
                          ("return_token_accuracy", bool(return_token_accuracy))):
        if refused:
            raise ValueError(f"{op}: {name} is not supported with process_group (vocabulary-parallel) yet")
    return weight.shape[0] * dist.get_world_size(group)


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the backward sums the partial gradients of the ranks (all-reduce)."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _CombineShards(torch.autograd.Function):
    """(ce_r, lse_r) of this rank's shard -> (ce, lse) over the whole vocabulary (0 at ignored tokens)."""

    @staticmethod
    def forward(ctx, ce_local, lse_local, in_shard, valid, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        lse_local = lse_local.contiguous()
        gathered = [torch.empty_like(lse_local) for _ in range(world)]
        dist.all_gather(gathered, lse_local, group=group)
        lse_all = torch.stack(gathered)                                            # [world, N]
        zero = torch.zeros((), dtype=lse_local.dtype, device=lse_local.device)
        owner = torch.stack([torch.where(in_shard, lse_local, zero), torch.where(in_shard, ce_local, zero)])
        dist.all_reduce(owner, group=group)                                        # (lse_{r*}, ce_{r*})
        lse = torch.where(valid, torch.logsumexp(lse_all, 0), zero)
        ce = torch.where(valid, owner[1] + torch.logsumexp(lse_all - owner[0], 0), zero)
        share = torch.where(valid, torch.exp(lse_all[rank] - lse), zero)          # softmax_r of the shards
        ctx.save_for_backward(share, in_shard)
        return ce, lse

    @staticmethod
    def backward(ctx, grad_ce, grad_lse):
        share, in_shard = ctx.saved_tensors
        zero = torch.zeros((), dtype=share.dtype, device=share.device)
        grad_ce = zero.expand(share.shape) if grad_ce is None else grad_ce
        grad_lse = zero.expand(share.shape) if grad_lse is None else grad_lse
        owned = torch.where(in_shard, grad_ce, zero)
        return owned, (grad_ce + grad_lse) * share - owned, None, None, None


def vocab_parallel_per_token(hidden2d, weight, target, row_index, bias, ignore_index, softcap, backend, group,
                             filter_eps, accum_dtype, vocab_order):
    """Per-token cross-entropy and lse over the whole vocabulary, both [N], differentiable, 0 at ignored tokens."""
    from .op import run

    shard = weight.shape[0]
    start = dist.get_rank(group) * shard
    valid = target != ignore_index
    in_shard = valid & (target >= start) & (target < start + shard)
    # every valid token needs this shard's lse: a token whose target lives elsewhere gets class 0 (its ce_r unused)
    local_target = torch.where(in_shard, target - start, torch.zeros_like(target))
    local_target = torch.where(valid, local_target, torch.full_like(target, ignore_index))
    states = _CopyToGroup.apply(hidden2d, group) if hidden2d.requires_grad and torch.is_grad_enabled() else hidden2d
    ce_local, lse_local = run(states, weight, local_target, row_index, bias, ignore_index, "none", 0.0, 0.0,
                              softcap, backend, filter_eps, accum_dtype, vocab_order, lse_grad=True)
    return _CombineShards.apply(ce_local, lse_local, in_shard, valid, group)
