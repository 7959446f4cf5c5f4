"""``contrastive_loss``: the public functional API, its ``torch.library`` custom op and the ``ContrastiveLoss`` module.

Drop-in for ``F.cross_entropy(query @ keys.T / temperature, target)`` and its relatives (false-negative masking,
logQ correction, pairwise BPR mode, symmetric CLIP / MNSRL mode, SigLIP sigmoid mode, per-row sample weights) that
never stores the B x M logit matrix. The math is
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
from .._validation import check_choice, check_reduction
from . import torch_impl
from .arguments import MODES, OP, check_process_group, validate
from .reference import compute_dtype_for, contrastive_loss_reference, zero_rows_without_negative



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
    stats = query.new_empty((torch_impl.STATS_ROWS, batch), dtype=dtype)
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


def _triton_rejects(query: Tensor, keys: Tensor, mode: str, symmetric: bool) -> Optional[str]:
    if symmetric and keys.shape[0] != query.shape[0]:
        return "symmetric=True with hard negatives (M > B) runs on the torch path (backend='torch')"
    if mode == "sigmoid":
        from .triton_sigmoid import sigmoid_rejects
        reason = sigmoid_rejects(query.shape[1])
        if reason is not None:
            return reason
    return _triton().triton_rejects(query)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


@autocast_inputs("query", "keys")
def contrastive_loss(query: Tensor, keys: Tensor, target: Optional[Tensor] = None, *,
                     temperature: Union[float, Tensor] = 0.05, key_ids: Optional[Tensor] = None,
                     logq: Optional[Tensor] = None, mode: str = "softmax", symmetric: bool = False,
                     reduction: str = "mean", backend: str = "auto", process_group=None,
                     sample_weight: Optional[Tensor] = None, bias: Union[None, float, Tensor] = None) -> Tensor:
    """In-batch contrastive loss of ``query`` [B, D] against ``keys`` [M, D] without the B x M logit matrix.

    With the defaults it equals ``F.cross_entropy(query @ keys.T / temperature, torch.arange(B))``. The math of
    every option is in ``reference.py``'s docstring.

    Args:
        target: [B] int64 index of each query's positive key (default ``arange(B)``, needs M >= B).
        temperature: python float or 0-d tensor, > 0 and finite (checked for floats and CPU tensors; a CUDA
            tensor is not checked, that would sync: 0, a negative or NaN there gives NaN losses); a tensor that
            requires grad receives its gradient (learnable temperature).
        key_ids: [M] int64 item id of each key; a key with the same id as the row's positive is a false negative
            and is excluded (the positive itself is kept).
        logq: [M] log sampling probability of each key, subtracted from its logit after the temperature scaling.
        mode: "softmax" (InfoNCE), "pairwise" (mean softplus(s_neg - s_pos) over valid negatives, BPR) or
            "sigmoid" (SigLIP: softplus(-(s_pos + bias)) + sum over valid negatives of softplus(s_neg + bias)).
        symmetric (bool or numpy bool): mean of the query->key and key->query losses (softmax, target=None); the
            key->query direction covers the first B keys (the positives): M == B is CLIP's loss, M = 2B (B
            positives, then B hard negatives) sentence-transformers' MultipleNegativesSymmetricRankingLoss.
            M > B runs on the torch path (the Triton kernels take M == B).
        reduction: "mean" (over all B rows), "sum" or "none" ([B]).
        backend: "auto" (Triton on CUDA, else the chunked torch path), "triton", "torch" or "reference".
        process_group: a ``torch.distributed`` ProcessGroup (anything else is a TypeError)
            (``torch.distributed.group.WORLD`` for all ranks): every rank's keys become negatives of the local
            queries (see ``karma_kernels.contrastive.distributed`` for the target offsets and how each reduction
            scales). None: this process's keys only.
        sample_weight: [B] floating per-row weight (TF-Recommenders): loss_i * w_i, then the reduction ("mean"
            divides by B, as Keras does; for a weighted average use "sum" / w.sum()). A tensor that requires
            grad receives its gradient. With weights the torch path recomputes the logits in the backward.
        bias: mode="sigmoid" only: python float or 0-d tensor added to every logit (SigLIP's learnable bias;
            default 0); a tensor that requires grad receives its gradient. SigLIP's logit_scale = exp(t) is
            ``temperature = exp(-t)``.

    Returns float32 (float64 for float64 inputs). In the softmax and pairwise modes a row with no valid negative
    has loss 0 and zero gradients.

    Autograd: ``retain_graph=True`` backwards repeat exactly; ``create_graph=True`` (gradient penalties,
    Hessian-vector products) returns gradients that are differentiable, formed by autograd through the reference
    formulas (that backward holds the B x M logits, like the reference). Meta tensors give the output shapes.
    """
    if isinstance(symmetric, np.bool_):  # numpy bools are bools (torch accepts them likewise)
        symmetric = bool(symmetric)
    if process_group is not None:
        check_process_group(process_group)
        from .distributed import distributed_contrastive_loss  # torch.distributed is imported only when used
        extra = {name: value for name, value in (("sample_weight", sample_weight), ("bias", bias))
                 if value is not None}
        return distributed_contrastive_loss(query, keys, target, process_group=process_group, key_ids=key_ids,
                                            logq=logq, temperature=temperature, mode=mode, symmetric=symmetric,
                                            reduction=reduction, backend=backend, **extra)
    device = validate(query, keys, target, temperature, key_ids, logq, mode, symmetric, reduction, sample_weight,
                       bias)

    # asked only once Triton can run on this device, so importing the kernels here costs nothing extra
    resolved = _backend.choose(OP, backend, device, lambda: _triton_rejects(query, keys, mode, symmetric))
    if resolved == "reference":
        return contrastive_loss_reference(query, keys, target, temperature, key_ids, logq, mode, symmetric,
                                          reduction, sample_weight=sample_weight, bias=bias)
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
    if mode != "sigmoid":  # sigmoid rows keep their positive's term without negatives
        query = zero_rows_without_negative(query, key_ids, target, keys.shape[0])  # reference.py: the mask decides
    if bias is not None:
        # s + b = q.k / T - (logq - b): the kernels see the bias as part of logq, its gradient is -sum(dlogq)
        bias = bias.to(device=device, dtype=compute_dtype) if isinstance(bias, Tensor) else float(bias)
        base = torch.zeros(keys.shape[0], dtype=compute_dtype, device=device) if logq is None else logq
        logq = base.to(compute_dtype) - bias
    if logq is not None:
        logq = logq.contiguous()
    if target.device.type == "cuda":
        torch._assert_async(((target >= 0) & (target < keys.shape[0])).all(),
                            f"{OP}: target values must index keys, in [0, {keys.shape[0]})")
    grad_enabled = torch.is_grad_enabled()
    needs_grad = grad_enabled and any(t is not None and t.requires_grad for t in (query, keys, temperature, logq))
    logq_grad = bool(grad_enabled and logq is not None and logq.requires_grad)
    op_reduction = reduction if sample_weight is None else "none"
    precompute = needs_grad and resolved == "torch" and op_reduction != "none"
    loss = torch.ops.karma.contrastive_loss(query, keys, target, temperature, key_ids, logq, mode, symmetric,
                                            op_reduction, resolved, precompute, logq_grad)[0]
    if sample_weight is not None:
        loss = _reduce(loss * sample_weight.to(loss.dtype), reduction)
    return loss


class ContrastiveLoss(nn.Module):
    """Module form of :func:`contrastive_loss`.

    ``learn_temperature=True`` stores log(temperature) as a Parameter (``log_temperature``) so the temperature
    stays positive while it is learned. ``bias`` (mode="sigmoid"): the logit bias, a Parameter when
    ``learn_bias``; SigLIP starts from ``ContrastiveLoss(0.1, learn_temperature=True, mode="sigmoid", bias=-10.0,
    learn_bias=True)``.
    """

    def __init__(self, temperature: float = 0.05, *, learn_temperature: bool = False, mode: str = "softmax",
                 symmetric: bool = False, reduction: str = "mean", backend: str = "auto",
                 bias: Optional[float] = None, learn_bias: bool = False):
        super().__init__()
        if (bias is not None or learn_bias) and mode != "sigmoid":
            raise ValueError(f"ContrastiveLoss: bias / learn_bias need mode='sigmoid', got mode={mode!r}")
        if bias is not None and not (isinstance(bias, numbers.Real) and not isinstance(bias, bool)
                                     and math.isfinite(bias)):
            raise ValueError(f"ContrastiveLoss: bias must be a finite float, got {bias!r}")
        if learn_bias:
            self.bias = nn.Parameter(torch.tensor(float(bias or 0.0), dtype=torch.float32))
        else:
            self.bias = bias
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
                logq: Optional[Tensor] = None, sample_weight: Optional[Tensor] = None) -> Tensor:
        return contrastive_loss(query, keys, target, temperature=self.temperature, key_ids=key_ids, logq=logq,
                                mode=self.mode, symmetric=self.symmetric, reduction=self.reduction,
                                backend=self.backend, sample_weight=sample_weight, bias=self.bias)

    def extra_repr(self) -> str:
        temperature = "learned" if self.learn_temperature else self.fixed_temperature
        bias = "" if self.bias is None else f", bias={'learned' if isinstance(self.bias, Tensor) else self.bias}"
        return (f"temperature={temperature}, mode={self.mode!r}, symmetric={self.symmetric}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}{bias}")
