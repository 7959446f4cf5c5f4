"""The custom ops behind ``linear_cross_entropy`` and their autograd rule.

Two custom ops carry the work so that ``torch.compile`` treats them as opaque:
  ``karma::linear_cross_entropy``           loss (reduced), per-token softmax statistics [2, N] (row max and the
                                            log-sum-exp relative to it; lse = their sum), and — on the torch
                                            path with a scalar reduction — the gradients for a unit upstream
                                            gradient, computed in the same chunk pass (3 matmuls per chunk
                                            instead of 4)
  ``karma::linear_cross_entropy_backward``  the gradients of sum_n s_n loss_n recomputed from the saved inputs and
                                            statistics (reduction "none", the Triton path, a second backward)

Autograd (``_backward``):
  * the loss part: the precomputed gradients scaled by the upstream gradient (in place, once), else the backward op;
  * the lse part (only when the public API asked for a differentiable lse and it received a gradient h):
    dlse_n/dz_nj = p_nj = (p_nj - [j = t_n]) + [j = t_n], i.e. the plain cross-entropy backward with upstream h
    plus a gather/scatter of the target rows (``_target_logit_grads``, O(N D)). Without label smoothing it merges
    into the loss part's single backward: upstream s = g (1 + 2 z_loss lse) + h with z_loss = 0, plus the target
    term (s - g) at [j = t_n];
  * ``create_graph=True`` (double backward): the gradients are computed by autograd through the reference
    formulas (``reference.py``, which materialises the [N, V] logits), so they are themselves differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as _reference
from . import torch_impl as _torch_impl


def _triton_impl():
    from . import triton_impl  # imported lazily: triton is optional for the CPU path

    return triton_impl


def n_valid(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (target != ignore_index).sum()


def reduce_tokens(per_token: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / n_valid(target, ignore_index)  # 0 / 0 = NaN when every token is ignored, as F.cross_entropy


def _reference_per_token(hidden, weight, target, row_index, bias, ignore_index, label_smoothing, z_loss, softcap):
    states = hidden if row_index is None else hidden.index_select(0, row_index)
    return _reference.linear_cross_entropy_reference(
        states, weight, target, bias=bias, ignore_index=ignore_index, reduction="none",
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, return_lse=True)


def _no_grad(like: torch.Tensor) -> torch.Tensor:
    """Placeholder for a gradient that was not asked for (custom ops cannot return None)."""
    return like.new_empty((0,))


@torch.library.custom_op("karma::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, row_index: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
    softcap: Optional[float], backend: str, precompute_grads: bool, need_grad_hidden: bool,
    need_grad_weight: bool, need_grad_bias: bool, filter_eps: float = 0.0, accum_dtype: Optional[str] = None,
    vocab_order: bool = False, lse_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [R, D], target [N] -> (loss, softmax_stats [2, N], grad_hidden, grad_weight, grad_bias).

    Gradients are empty unless ``precompute_grads`` (torch backend, reduction mean/sum): then they are the
    gradients of the reduced loss for an upstream gradient of 1, and the backward only scales them.
    ``filter_eps``, ``accum_dtype`` and ``vocab_order`` are options of the Triton backward (carried here for
    autograd); ``lse_grad``: the statistics (lse = stats[0] + stats[1]) are differentiable outputs.
    """
    grad_hidden, grad_weight, grad_bias = _no_grad(hidden), _no_grad(weight), _no_grad(hidden)
    if backend == "reference":
        per_token, lse = _reference_per_token(hidden, weight, target, row_index, bias, ignore_index,
                                              label_smoothing, z_loss, softcap)
        stats = torch.stack([lse, torch.zeros_like(lse)])
    elif backend == "triton":
        per_token, stats = _triton_impl().forward(hidden, weight, target, row_index=row_index, bias=bias,
                                                ignore_index=ignore_index, label_smoothing=label_smoothing,
                                                z_loss=z_loss, softcap=softcap)
    else:
        grad_scale = None
        if precompute_grads and reduction != "none":
            # the torch path runs on CPU: reading the count is free there (and one sync per step elsewhere)
            count = int(n_valid(target, ignore_index))
            grad_scale = 1.0 if reduction == "sum" else 1.0 / max(count, 1)
        per_token, lse, gh, gw, gb = _torch_impl.chunked_linear_cross_entropy(
            hidden, weight, target, row_index=row_index, bias=bias, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, grad_scale=grad_scale,
            need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight,
            need_grad_bias=need_grad_bias, cast_grads=False)  # fp32: cast after the backward's scaling
        stats = torch.stack([lse, torch.zeros_like(lse)])
        grad_hidden = gh if gh is not None else grad_hidden
        grad_weight = gw if gw is not None else grad_weight
        grad_bias = gb if gb is not None else grad_bias
    loss = reduce_tokens(per_token, target, ignore_index, reduction)
    return loss, stats, grad_hidden, grad_weight, grad_bias


@linear_cross_entropy_op.register_fake
def _(hidden, weight, target, row_index, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, backend,
      precompute_grads, need_grad_hidden, need_grad_weight, need_grad_bias, filter_eps=0.0, accum_dtype=None,
      vocab_order=False, lse_grad=False):
    acc = _reference.compute_dtype(hidden.dtype)
    n_tokens = target.shape[0]
    loss = hidden.new_empty((n_tokens,) if reduction == "none" else (), dtype=acc)
    stats = hidden.new_empty((2, n_tokens), dtype=acc if backend != "triton" else torch.float32)
    precomputed = precompute_grads and reduction != "none" and backend == "torch"
    # precomputed gradients are in the accumulation dtype (cast after the backward's scaling)
    grad_hidden = hidden.new_empty(hidden.shape if precomputed and need_grad_hidden else (0,),
                                   dtype=acc if precomputed and need_grad_hidden else hidden.dtype)
    grad_weight = weight.new_empty(weight.shape if precomputed and need_grad_weight else (0,),
                                   dtype=acc if precomputed and need_grad_weight else weight.dtype)
    has_bias_grad = precomputed and need_grad_bias and bias is not None
    grad_bias = bias.new_empty(bias.shape, dtype=acc) if has_bias_grad else hidden.new_empty((0,))
    return loss, stats, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("karma::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
    row_index: Optional[torch.Tensor], bias: Optional[torch.Tensor], stats: torch.Tensor, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float], backend: str,
    need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool, filter_eps: float = 0.0,
    accum_dtype: Optional[str] = None, vocab_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients recomputed from the inputs (and, on the Triton path, the forward's softmax statistics).
    Unneeded ones come back empty."""
    if reduction == "mean":
        grad_scale = grad_loss / n_valid(target, ignore_index).clamp_min(1)
    else:
        grad_scale = grad_loss
    acc = _reference.compute_dtype(hidden.dtype)
    grad_scale = grad_scale.to(acc)
    if backend == "reference":
        gh, gw, gb = _reference_backward(grad_scale, hidden, weight, target, row_index, bias, ignore_index,
                                         label_smoothing, z_loss, softcap)
    elif backend == "triton":
        gh, gw, gb = _triton_impl().backward(
            grad_scale, hidden, weight, target, stats, row_index=row_index, bias=bias, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, need_grad_hidden=need_grad_hidden,
            need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias, filter_eps=filter_eps,
            accum_dtype=accum_dtype, vocab_order=vocab_order)
    else:
        _, _, gh, gw, gb = _torch_impl.chunked_linear_cross_entropy(
            hidden, weight, target, row_index=row_index, bias=bias, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, grad_scale=grad_scale,
            need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias)
    return (gh if need_grad_hidden and gh is not None else _no_grad(hidden),
            gw if need_grad_weight and gw is not None else _no_grad(weight),
            gb if need_grad_bias and gb is not None else _no_grad(hidden))


@linear_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, target, row_index, bias, stats, ignore_index, reduction, label_smoothing, z_loss,
      softcap, backend, need_grad_hidden, need_grad_weight, need_grad_bias, filter_eps=0.0, accum_dtype=None,
      vocab_order=False):
    grad_hidden = hidden.new_empty(hidden.shape if need_grad_hidden else (0,))
    grad_weight = weight.new_empty(weight.shape if need_grad_weight else (0,))
    grad_bias = bias.new_empty(bias.shape) if need_grad_bias and bias is not None else hidden.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias


def _reference_backward(grad_scale, hidden, weight, target, row_index, bias, ignore_index, label_smoothing,
                        z_loss, softcap):
    states = hidden if row_index is None else hidden.index_select(0, row_index)
    grad_states, grad_weight, grad_bias = _reference.linear_cross_entropy_reference_grads(
        grad_scale, states, weight, target, bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap)
    if row_index is None:
        return grad_states, grad_weight, grad_bias
    grad_hidden = torch.zeros_like(hidden).index_add_(0, row_index, grad_states)
    return grad_hidden, grad_weight, grad_bias


# ------------------------------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    (hidden, weight, target, row_index, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, backend,
     precompute_grads, need_grad_hidden, need_grad_weight, need_grad_bias, filter_eps, accum_dtype,
     vocab_order, lse_grad) = inputs
    _, stats, grad_hidden, grad_weight, grad_bias = output
    ctx.set_materialize_grads(False)  # an unused loss or lse gets None: no work for it
    precomputed = precompute_grads and reduction != "none" and backend == "torch"
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap, backend, filter_eps, accum_dtype,
                   vocab_order)
    ctx.has_bias = bias is not None
    ctx.lse_grad = lse_grad
    # The inputs are saved in every case (references, no copies): a second backward (retain_graph=True) after the
    # precomputed gradients were consumed, and create_graph=True, recompute from them.
    saved = (hidden, weight, target, row_index, bias, stats)
    ctx.unit_grads = None
    ctx.traced = False
    if precomputed:
        eager = (not torch.compiler.is_compiling()
                 and all(type(t) is torch.Tensor for t in (grad_hidden, grad_weight, grad_bias)))
        if eager:
            # detached aliases (no reference cycle through the outputs), scaled in place and handed to autograd by
            # the first backward, which then forgets them: no second [V, D] buffer
            ctx.unit_grads = [grad_hidden.detach(), grad_weight.detach(), grad_bias.detach()]
        else:
            # traced (torch.compile / AOT autograd / functorch): saved, scaled out of place, never mutated
            ctx.traced = True
            saved = saved + (grad_hidden, grad_weight, grad_bias)
    ctx.save_for_backward(*saved)


def _token_upstream(grad_loss: Optional[torch.Tensor], target, ignore_index, reduction, acc) -> Optional[torch.Tensor]:
    """The per-token upstream gradient g_n [N] of the (reduced) loss; None when the loss got no gradient."""
    if grad_loss is None:
        return None
    grad_loss = grad_loss.to(acc)
    if reduction == "mean":
        grad_loss = grad_loss / n_valid(target, ignore_index).clamp_min(1)
    return grad_loss.expand(target.shape)


def _target_logit_grads(coef, hidden, weight, target, row_index, bias, ignore_index, softcap, needs):
    """Gradients of sum_n coef_n z_n[t_n] (z the soft-capped logits; 0 at ignored tokens): a gather of the target
    rows of ``weight``, O(N D). Returns fp32/fp64 (grad_hidden, grad_weight, grad_bias), None where not needed."""
    acc = coef.dtype
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    rows = torch.arange(target.numel(), device=target.device) if row_index is None else row_index
    states = hidden.index_select(0, rows).to(acc)
    states = torch.where(valid.unsqueeze(1), states, torch.zeros((), dtype=acc, device=states.device))  # 0 x NaN
    target_rows = weight.index_select(0, safe_target).to(acc)
    coef = torch.where(valid, coef, torch.zeros_like(coef))
    if softcap is not None:
        y = (states * target_rows).sum(1)
        if bias is not None:
            y = y + bias.to(acc).index_select(0, safe_target)
        coef = coef * (1 - torch.tanh(y / softcap).square())
    need_hidden, need_weight, need_bias = needs
    grad_hidden = grad_weight = grad_bias = None
    if need_hidden:
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device).index_add_(
            0, rows, coef.unsqueeze(1) * target_rows)
    if need_weight:
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device).index_add_(
            0, safe_target, coef.unsqueeze(1) * states)
    if need_bias:
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device).index_add_(0, safe_target, coef)
    return grad_hidden, grad_weight, grad_bias


def _add_grads(grads, extra, inputs):
    """grads (input dtype or None) + extra (fp32 or None), in the inputs' dtypes."""
    out = []
    for g, e, x in zip(grads, extra, inputs):
        if e is None:
            out.append(g)
        elif g is None:
            out.append(e.to(x.dtype))
        else:
            out.append((g.to(e.dtype) + e).to(x.dtype))
    return out


def _differentiable_grads(ctx, grad_loss, grad_lse, needs):
    """create_graph=True: the gradients by autograd through the reference (materialises the [N, V] logits), so that
    they are differentiable in the inputs and in the upstream gradients."""
    hidden, weight, target, row_index, bias = ctx.saved_tensors[:5]
    ignore_index, reduction, label_smoothing, z_loss, softcap = ctx.options[:5]
    with torch.enable_grad():
        per_token, lse = _reference_per_token(hidden, weight, target, row_index, bias, ignore_index,
                                              label_smoothing, z_loss, softcap)
        objective = per_token.new_zeros(())
        upstream = _token_upstream(grad_loss, target, ignore_index, reduction, per_token.dtype)
        if upstream is not None:
            objective = objective + (upstream * per_token).sum()
        if grad_lse is not None:
            objective = objective + (grad_lse.to(lse.dtype) * lse).sum()
        wanted = [t for t, need in zip((hidden, weight, bias), needs) if need]
        found = iter(torch.autograd.grad(objective, wanted, create_graph=True, allow_unused=True) if wanted else ())
    return [next(found) if need else None for need in needs]


def _backward(ctx, grad_loss, grad_stats, *unused_grad_outputs):
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
    needs = (need_hidden, need_weight, need_bias and ctx.has_bias)
    (ignore_index, reduction, label_smoothing, z_loss, softcap, backend, filter_eps, accum_dtype,
     vocab_order) = ctx.options
    # lse = stats[0] + stats[1]: both rows carry its gradient
    grad_lse = grad_stats[0] if (ctx.lse_grad and grad_stats is not None) else None
    unit_grads, ctx.unit_grads = ctx.unit_grads, None
    grads = [None] * 19
    if grad_loss is None and grad_lse is None:
        return tuple(grads)
    if torch.is_grad_enabled():  # create_graph=True
        result = _differentiable_grads(ctx, grad_loss, grad_lse, needs)
    else:
        result = _first_order_grads(ctx, grad_loss, grad_lse, unit_grads, needs)
    grads[0], grads[1], grads[4] = result
    return tuple(grads)


def _first_order_grads(ctx, grad_loss, grad_lse, unit_grads, needs):
    saved = ctx.saved_tensors
    hidden, weight, target, row_index, bias, stats = saved[:6]
    (ignore_index, reduction, label_smoothing, z_loss, softcap, backend, filter_eps, accum_dtype,
     vocab_order) = ctx.options
    inputs = (hidden, weight, bias)

    def recompute(upstream, reduction_, smoothing, z):
        out = linear_cross_entropy_backward_op(
            upstream, hidden, weight, target, row_index, bias, stats, ignore_index, reduction_, smoothing, z,
            softcap, backend, *needs, filter_eps, accum_dtype, vocab_order)
        return [g if need else None for g, need in zip(out, needs)]

    precomputed = unit_grads if unit_grads is not None else (saved[6:] if ctx.traced else None)
    grads = [None, None, None]
    merged = False
    if grad_loss is not None:
        if precomputed is not None:
            # the precomputed gradients are fp32 (fp64 for fp64 inputs): scaled first, then cast to the input's
            # dtype (casting first would overflow an fp16 gradient whose upstream is < 1)
            if unit_grads is not None and type(grad_loss) is torch.Tensor:
                grads = [g.mul_(grad_loss) if need else None for g, need in zip(precomputed, needs)]
            else:
                grads = [g * grad_loss if need else None for g, need in zip(precomputed, needs)]
            grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs)]
        elif grad_lse is None or label_smoothing:
            grads = recompute(grad_loss, reduction, label_smoothing, z_loss)
        else:
            merged = True
    if grad_lse is None:
        return grads
    acc = _reference.compute_dtype(hidden.dtype)
    grad_lse = grad_lse.to(acc)
    if merged:
        # one plain cross-entropy backward with upstream s = g (1 + 2 z lse) + h, and (s - g) at the targets
        upstream = _token_upstream(grad_loss, target, ignore_index, reduction, acc)
        lse = (stats[0] + stats[1]).to(acc)
        target_coef = 2 * z_loss * upstream * lse + grad_lse if z_loss else grad_lse
        scale = upstream + target_coef
    else:
        target_coef = scale = grad_lse
    grads = _add_grads(grads, recompute(scale.contiguous(), "none", 0.0, 0.0), inputs)
    extra = _target_logit_grads(target_coef, hidden, weight, target, row_index, bias, ignore_index, softcap, needs)
    return _add_grads(grads, extra, inputs)


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
