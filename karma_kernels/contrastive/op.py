"""``contrastive_loss``: the public functional API, its ``torch.library`` custom op and the ``ContrastiveLoss`` module.

Drop-in for ``F.cross_entropy(query @ keys.T / temperature, target)`` and its relatives (false-negative masking,
logQ correction, pairwise BPR mode, symmetric CLIP mode) that never stores the B x M logit matrix. The math is
documented in ``reference.py``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .. import _backend
from .._autocast import autocast_inputs
from .._validation import check_choice, check_reduction, check_same_device, check_tensor
from . import torch_impl
from .reference import compute_dtype_for, contrastive_loss_reference, zero_rows_without_negative

OP = "contrastive_loss"
MODES = ("softmax", "pairwise")


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)


def _triton():
    from . import triton_impl  # imported on first use: importing triton is slow and needs TRITON_INTERPRET set first
    return triton_impl


def _precomputes(precompute_grads: bool, reduction: str, backend: str) -> bool:
    """Gradients come out of the forward only on the torch path and for a uniform upstream gradient."""
    return precompute_grads and reduction != "none" and backend == "torch"


@torch.library.custom_op("karma::contrastive_loss", mutates_args=())
def _contrastive_loss_op(query: Tensor, keys: Tensor, target: Tensor, temperature: Tensor, key_ids: Optional[Tensor],
                         logq: Optional[Tensor], mode: str, symmetric: bool, reduction: str, backend: str,
                         precompute_grads: bool, logq_grad: bool
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, stats, dq, dk, dtemperature, dlogq). The four gradients are those of the reduced loss for a
    unit upstream gradient, formed during the forward pass when ``precompute_grads`` (torch backend, reduction
    mean/sum), else empty; they are in the compute dtype and the backward scales them."""
    row_coef = None
    if _precomputes(precompute_grads, reduction, backend):
        row_coef = 1.0 / query.shape[0] if reduction == "mean" else 1.0
    if backend == "triton":
        loss, stats = _triton().contrastive_forward(query, keys, target, temperature, key_ids, logq, mode, symmetric)
        grads = None
    else:
        loss, stats, grads = torch_impl.contrastive_forward(query, keys, target, temperature, key_ids, logq, mode,
                                                            symmetric, grad_row_coef=row_coef, want_logq_grad=logq_grad)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    if grads is None:
        return loss, stats, _empty(stats), _empty(stats), _empty(stats), _empty(stats)
    dq, dk, dtemperature, dlogq = grads
    return loss, stats, dq, dk, dtemperature.reshape(()), dlogq if dlogq is not None else _empty(stats)


@_contrastive_loss_op.register_fake
def _(query, keys, target, temperature, key_ids, logq, mode, symmetric, reduction, backend, precompute_grads,
      logq_grad):
    dtype = compute_dtype_for(query.dtype)
    batch = query.shape[0]
    loss = query.new_empty((batch,) if reduction == "none" else (), dtype=dtype)
    stats = query.new_empty((3, batch), dtype=dtype)
    if not _precomputes(precompute_grads, reduction, backend):
        return loss, stats, _empty(stats), _empty(stats), _empty(stats), _empty(stats)
    dlogq = query.new_empty((keys.shape[0],), dtype=dtype) if logq_grad else _empty(stats)
    return (loss, stats, query.new_empty(query.shape, dtype=dtype), keys.new_empty(keys.shape, dtype=dtype),
            query.new_empty((), dtype=dtype), dlogq)


@torch.library.custom_op("karma::contrastive_loss_backward", mutates_args=())
def _contrastive_loss_backward_op(row_coef: Tensor, query: Tensor, keys: Tensor, target: Tensor, temperature: Tensor,
                                  key_ids: Optional[Tensor], logq: Optional[Tensor], stats: Tensor, mode: str,
                                  symmetric: bool, backend: str, logq_grad: bool
                                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum_i row_coef_i * loss_i, recomputing the logits from the saved per-row ``stats``."""
    if backend == "triton":
        # like PyTorch's own kernels: the schedule without atomics when determinism is asked for
        dq, dk, dtemperature, dlogq = _triton().contrastive_backward(
            row_coef, query, keys, target, temperature, key_ids, logq, mode, symmetric, stats, want_logq_grad=logq_grad,
            deterministic=torch.are_deterministic_algorithms_enabled())
    else:
        dq, dk, dtemperature, dlogq = torch_impl.contrastive_backward(
            row_coef, query, keys, target, temperature, key_ids, logq, mode, symmetric, stats,
            want_logq_grad=logq_grad)
    dlogq = dlogq.to(logq.dtype) if (logq_grad and logq is not None) else _empty(query)
    return (dq.to(query.dtype), dk.to(keys.dtype), dtemperature.reshape(()).to(temperature.dtype), dlogq)


@_contrastive_loss_backward_op.register_fake
def _(row_coef, query, keys, target, temperature, key_ids, logq, stats, mode, symmetric, backend, logq_grad):
    dlogq = torch.empty_like(logq) if (logq_grad and logq is not None) else _empty(query)
    return torch.empty_like(query), torch.empty_like(keys), torch.empty_like(temperature), dlogq


def _setup_context(ctx, inputs, output):
    query, keys, target, temperature, key_ids, logq, mode, symmetric, reduction, backend, precompute, logq_grad = inputs
    loss, stats, dq, dk, dtemperature, dlogq = output
    ctx.mark_non_differentiable(stats, dq, dk, dtemperature, dlogq)
    precompute = _precomputes(precompute, reduction, backend)
    ctx.options = (mode, symmetric, reduction, backend, precompute, logq_grad)
    ctx.dtypes = (query.dtype, keys.dtype, None if logq is None else logq.dtype)
    # the inputs are saved in every case: a double backward (create_graph=True) differentiates through them
    ctx.save_for_backward(query, keys, target, temperature, key_ids, logq, stats, dq, dk, dtemperature, dlogq)


def _row_coef(grad_loss: Tensor, reduction: str, batch: int) -> Tensor:
    """The upstream gradient of each row's loss."""
    if reduction == "none":
        return grad_loss
    return grad_loss.expand(batch) / batch if reduction == "mean" else grad_loss.expand(batch)


def _differentiable_backward(ctx, grad_loss: Tensor) -> tuple:
    """The gradients as a differentiable function of the inputs and ``grad_loss`` (double backward: gradient
    penalties, Hessian-vector products): autograd through the reference formulas, which hold the B x M logits."""
    mode, symmetric, reduction, _, _, logq_grad = ctx.options
    query, keys, target, temperature, key_ids, logq, _ = ctx.saved_tensors[:7]
    wanted = [(0, query), (1, keys), (3, temperature)] + ([(5, logq)] if logq_grad else [])
    wanted = [(slot, t) for slot, t in wanted if ctx.needs_input_grad[slot]]
    grads = [None] * 12
    if not wanted:
        return tuple(grads)
    per_row = contrastive_loss_reference(query, keys, target, temperature, key_ids, logq, mode, symmetric,
                                         reduction="none")
    row_coef = _row_coef(grad_loss, reduction, query.shape[0]).to(per_row.dtype)
    found = torch.autograd.grad(per_row, [t for _, t in wanted], grad_outputs=row_coef, create_graph=True,
                                allow_unused=True)
    for (slot, t), grad in zip(wanted, found):
        grads[slot] = torch.zeros_like(t) if grad is None else grad.to(t.dtype)
    return tuple(grads)


def _backward(ctx, grad_loss, *unused_grads):
    mode, symmetric, reduction, backend, precompute, logq_grad = ctx.options
    query_dtype, keys_dtype, logq_dtype = ctx.dtypes
    if torch.is_grad_enabled():  # backward(create_graph=True)
        return _differentiable_backward(ctx, grad_loss)
    if precompute:
        dq, dk, dtemperature, dlogq = ctx.saved_tensors[7:]
        grad_loss = grad_loss.to(dq.dtype)
        dlogq = (dlogq * grad_loss).to(logq_dtype) if logq_grad else None
        return ((dq * grad_loss).to(query_dtype), (dk * grad_loss).to(keys_dtype), None, dtemperature * grad_loss,
                None, dlogq, None, None, None, None, None, None)
    query, keys, target, temperature, key_ids, logq, stats = ctx.saved_tensors[:7]
    row_coef = _row_coef(grad_loss, reduction, query.shape[0])
    dq, dk, dtemperature, dlogq = torch.ops.karma.contrastive_loss_backward(
        row_coef.contiguous(), query, keys, target, temperature, key_ids, logq, stats, mode, symmetric, backend,
        logq_grad)
    return (dq, dk, None, dtemperature, None, dlogq if logq_grad else None,
            None, None, None, None, None, None)


_contrastive_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check_process_group(process_group) -> None:
    import torch.distributed as dist
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"{OP}: process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}")


def _check_temperature_value(temperature: Tensor) -> None:
    """A 0-d temperature tensor's value, where reading it is free: on the CPU, outside torch.compile. A CUDA
    temperature is not read (a host sync): 0, a negative or NaN there gives NaN losses."""
    if temperature.device.type == "cpu" and not torch.compiler.is_compiling():
        value = float(temperature.detach())
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{OP}: temperature must be > 0 and finite, got a tensor holding {value!r}")


def _validate(query, keys, target, temperature, key_ids, logq, mode, symmetric, reduction):
    check_tensor(OP, "query", query, ndim=2, floating=True)
    check_tensor(OP, "keys", keys, ndim=2, floating=True)
    batch, dim = query.shape
    num_keys = keys.shape[0]
    if batch == 0 or dim == 0:
        raise ValueError(f"{OP}: query must be non-empty [B, D], got shape {tuple(query.shape)}")
    if num_keys == 0:
        raise ValueError(f"{OP}: keys must hold at least one key, got shape {tuple(keys.shape)}")
    if keys.shape[1] != dim:
        raise ValueError(f"{OP}: keys must be [M, D] with the query's D={dim}, got shape {tuple(keys.shape)}")
    if keys.dtype != query.dtype:
        raise TypeError(f"{OP}: keys must have the query's dtype {query.dtype}, got {keys.dtype}")
    check_choice(OP, "mode", mode, MODES)
    check_reduction(OP, reduction)
    if not isinstance(symmetric, bool):
        raise TypeError(f"{OP}: symmetric must be a bool, got {type(symmetric).__name__}")
    if isinstance(temperature, Tensor):
        if temperature.dim() != 0 or not temperature.is_floating_point():
            raise ValueError(f"{OP}: temperature must be a python float or a 0-d floating tensor, got a "
                             f"{temperature.dtype} tensor of shape {tuple(temperature.shape)}")
        _check_temperature_value(temperature)
    elif isinstance(temperature, numbers.Real) and not isinstance(temperature, bool):
        # python numbers are checked here; a tensor is not (that would be a host sync on a GPU)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{OP}: temperature must be > 0, got {temperature!r}")
    else:
        raise TypeError(f"{OP}: temperature must be a python float or a 0-d tensor, got {type(temperature).__name__}")
    if target is not None:
        check_tensor(OP, "target", target, ndim=1, integer=True)
        if target.shape[0] != batch:
            raise ValueError(f"{OP}: target must have B={batch} entries (one per query), got {target.shape[0]}")
    elif num_keys < batch:
        raise ValueError(f"{OP}: target=None means target = arange(B), which needs M >= B keys; got B={batch}, "
                         f"M={num_keys} (pass target to pick the positives)")
    if key_ids is not None:
        check_tensor(OP, "key_ids", key_ids, ndim=1, integer=True)
        if key_ids.shape[0] != num_keys:
            raise ValueError(f"{OP}: key_ids must have M={num_keys} entries (one per key), got {key_ids.shape[0]}")
    if logq is not None:
        check_tensor(OP, "logq", logq, ndim=1, floating=True)
        if logq.shape[0] != num_keys:
            raise ValueError(f"{OP}: logq must have M={num_keys} entries (one per key), got {logq.shape[0]}")
    if symmetric:
        if mode != "softmax":
            raise ValueError(f"{OP}: symmetric=True needs mode='softmax', got mode={mode!r}")
        if target is not None:
            raise ValueError(f"{OP}: symmetric=True pairs query i with key i; pass target=None")
        if num_keys != batch:
            raise ValueError(f"{OP}: symmetric=True needs as many keys as queries (M == B), got B={batch}, "
                             f"M={num_keys}")
    device = check_same_device(OP, query=query, keys=keys, target=target, key_ids=key_ids, logq=logq)
    if target is not None and device.type == "cpu" and not torch.compiler.is_compiling():
        # a value check: on CPU it costs no device sync; on GPUs it is left to the kernels' masked loads
        if bool(((target < 0) | (target >= num_keys)).any()):
            raise ValueError(f"{OP}: target values must index keys, in [0, {num_keys}); got min "
                             f"{int(target.min())}, max {int(target.max())}")
    return device


@autocast_inputs("query", "keys")
def contrastive_loss(query: Tensor, keys: Tensor, target: Optional[Tensor] = None, *,
                     temperature: Union[float, Tensor] = 0.05, key_ids: Optional[Tensor] = None,
                     logq: Optional[Tensor] = None, mode: str = "softmax", symmetric: bool = False,
                     reduction: str = "mean", backend: str = "auto", process_group=None) -> Tensor:
    """In-batch contrastive loss of ``query`` [B, D] against ``keys`` [M, D] without the B x M logit matrix.

    With the defaults it equals ``F.cross_entropy(query @ keys.T / temperature, torch.arange(B))``.

    Args:
        target: [B] int64 index of each query's positive key (default ``arange(B)``, needs M >= B).
        temperature: python float or 0-d tensor, > 0 and finite (checked for floats and CPU tensors; a CUDA
            tensor is not checked, that would sync: 0, a negative or NaN there gives NaN losses); a tensor that
            requires grad receives its gradient (learnable temperature).
        key_ids: [M] int64 item id of each key; a key with the same id as the row's positive is a false negative
            and is excluded (the positive itself is kept).
        logq: [M] log sampling probability of each key, subtracted from its logit after the temperature scaling.
        mode: "softmax" (InfoNCE) or "pairwise" (mean softplus(s_neg - s_pos) over valid negatives, BPR).
        symmetric (bool or numpy bool): CLIP-style mean of the query->key and key->query losses (softmax, M == B, target=None).
        reduction: "mean" (over all B rows), "sum" or "none" ([B]).
        backend: "auto" (Triton on CUDA, else the chunked torch path), "triton", "torch" or "reference".
        process_group: a ``torch.distributed`` ProcessGroup (anything else is a TypeError) (``torch.distributed.group.WORLD`` for all ranks): every
            rank's keys become negatives of the local queries (see ``karma_kernels.contrastive.distributed`` for
            the target offsets and how each reduction scales). None: this process's keys only.

    Returns float32 (float64 for float64 inputs). A row with no valid negative has loss 0 and zero gradients.

    Autograd: ``retain_graph=True`` backwards repeat exactly; ``create_graph=True`` (gradient penalties,
    Hessian-vector products) returns gradients that are differentiable, formed by autograd through the reference
    formulas (that backward holds the B x M logits, like the reference). Meta tensors give the output shapes.
    """
    if isinstance(symmetric, np.bool_):  # numpy bools are bools (torch accepts them likewise)
        symmetric = bool(symmetric)
    if process_group is not None:
        _check_process_group(process_group)
        from .distributed import distributed_contrastive_loss  # torch.distributed is imported only when used
        return distributed_contrastive_loss(query, keys, target, process_group=process_group, key_ids=key_ids,
                                            logq=logq, temperature=temperature, mode=mode, symmetric=symmetric,
                                            reduction=reduction, backend=backend)
    device = _validate(query, keys, target, temperature, key_ids, logq, mode, symmetric, reduction)

    # asked only once Triton can run on this device, so importing the kernels here costs nothing extra
    resolved = _backend.choose(OP, backend, device, lambda: _triton().triton_rejects(query))
    if resolved == "reference":
        return contrastive_loss_reference(query, keys, target, temperature, key_ids, logq, mode, symmetric,
                                          reduction)
    compute_dtype = compute_dtype_for(query.dtype)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(device=device, dtype=compute_dtype)
    else:
        temperature = torch.full((), float(temperature), dtype=compute_dtype, device=device)
    if target is None:
        target = torch.arange(query.shape[0], device=device)
    target = target.long().contiguous()
    if key_ids is not None:
        key_ids = key_ids.long().contiguous()
    query = zero_rows_without_negative(query, key_ids, target, keys.shape[0])  # reference.py: the mask decides
    if logq is not None:
        logq = logq.contiguous()
    if target.device.type == "cuda":
        torch._assert_async(((target >= 0) & (target < keys.shape[0])).all(),
                            f"{OP}: target values must index keys, in [0, {keys.shape[0]})")
    grad_enabled = torch.is_grad_enabled()
    needs_grad = grad_enabled and any(t is not None and t.requires_grad for t in (query, keys, temperature, logq))
    logq_grad = bool(grad_enabled and logq is not None and logq.requires_grad)
    precompute = needs_grad and resolved == "torch" and reduction != "none"
    loss = torch.ops.karma.contrastive_loss(query, keys, target, temperature, key_ids, logq, mode, symmetric,
                                            reduction, resolved, precompute, logq_grad)[0]
    return loss


class ContrastiveLoss(nn.Module):
    """Module form of :func:`contrastive_loss`.

    ``learn_temperature=True`` stores log(temperature) as a Parameter (``log_temperature``) so the temperature
    stays positive while it is learned.
    """

    def __init__(self, temperature: float = 0.05, *, learn_temperature: bool = False, mode: str = "softmax",
                 symmetric: bool = False, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
                and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"ContrastiveLoss: temperature must be a float > 0, got {temperature!r}")
        check_choice("ContrastiveLoss", "mode", mode, MODES)
        check_reduction("ContrastiveLoss", reduction)
        check_choice("ContrastiveLoss", "backend", backend, _backend.BACKENDS)
        self.mode, self.symmetric, self.reduction, self.backend = mode, symmetric, reduction, backend
        self.learn_temperature = learn_temperature
        if learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature), dtype=torch.float32))
        else:
            self.fixed_temperature = float(temperature)

    @property
    def temperature(self) -> Union[float, Tensor]:
        return self.log_temperature.exp() if self.learn_temperature else self.fixed_temperature

    def forward(self, query: Tensor, keys: Tensor, target: Optional[Tensor] = None, key_ids: Optional[Tensor] = None,
                logq: Optional[Tensor] = None) -> Tensor:
        return contrastive_loss(query, keys, target, temperature=self.temperature, key_ids=key_ids, logq=logq,
                                mode=self.mode, symmetric=self.symmetric, reduction=self.reduction,
                                backend=self.backend)

    def extra_repr(self) -> str:
        temperature = "learned" if self.learn_temperature else self.fixed_temperature
        return (f"temperature={temperature}, mode={self.mode!r}, symmetric={self.symmetric}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
