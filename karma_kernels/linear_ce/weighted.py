"""Several cross-entropy objectives on one LM head in one fused call: ``weighted_linear_cross_entropy``.

``sum_n token_weight[n] * CE(F.linear(hidden[n], weight, bias), target[n])`` as one scalar, plus the per-token
losses (detached, for reporting each objective). A model with two LM objectives on a tied head (KARMA's
generation and reconstruction losses, each a mean over its own tokens with its own weight) concatenates their
tokens and passes ``token_weight = objective_weight / n_valid_tokens_of_that_objective``: the same loss and
gradients as two ``linear_cross_entropy`` calls.

Why one call: on the torch (CPU) path a scalar loss gets its gradients in the forward's chunk pass, so each
call holds a [V, D] fp32 weight gradient from its forward to its backward; two calls on one head hold two
(2 x 250 MiB at V = 128k, D = 512). One call over both token sets holds one, with the per-token weights as the
gradient's per-token scale; the backward only multiplies it by the upstream gradient (in place) and hands it to
autograd. On other backends (Triton: gradients recomputed in the backward anyway) it is
``linear_cross_entropy(reduction="none")`` weighted and summed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend
from .._validation import check_same_device, check_tensor
from .arguments import as_int, check_head, check_target_values
from . import torch_impl as _torch_impl
from .op import linear_cross_entropy

OP = "weighted_linear_cross_entropy"


def _unit_grads(needs, hidden, weight, bias, target, token_weight, ignore_index):
    """(per-token loss, and the fp32 gradients of sum_n w_n loss_n: hidden, weight, bias; None where not needed)."""
    per_token, _, grad_hidden, grad_weight, grad_bias = _torch_impl.chunked_linear_cross_entropy(
        hidden, weight, target, bias=bias, ignore_index=ignore_index, grad_scale=token_weight,
        need_grad_hidden=needs[0], need_grad_weight=needs[1], need_grad_bias=needs[2], cast_grads=False)
    return per_token, grad_hidden, grad_weight, grad_bias


class _PrecomputedWeightedCE(torch.autograd.Function):
    """torch path: loss and the gradients of sum_n w_n loss_n in one chunk pass; backward = scale + cast."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, ignore_index):
        per_token, grad_hidden, grad_weight, grad_bias = _unit_grads(ctx.needs_input_grad[:3], hidden, weight, bias,
                                                                     target, token_weight, ignore_index)
        ctx.unit_grads = [grad_hidden, grad_weight, grad_bias]
        # references (no copies): a second backward (retain_graph=True) recomputes from them
        ctx.save_for_backward(hidden, weight, bias, target, token_weight)
        ctx.ignore_index = ignore_index
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        total = (per_token * token_weight.to(per_token.dtype)).sum()
        ctx.mark_non_differentiable(per_token)
        return total, per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_per_token):
        grads, ctx.unit_grads = ctx.unit_grads, None
        if grads is None:  # a second backward through the same graph: the first one consumed them
            hidden, weight, bias, target, token_weight = ctx.saved_tensors
            grads = _unit_grads(ctx.needs_input_grad[:3], hidden, weight, bias, target, token_weight,
                                ctx.ignore_index)[1:]
        out = []
        for grad, dtype in zip(grads, ctx.dtypes):
            if grad is not None:
                grad = grad.mul_(grad_total.to(grad.dtype))  # in place: no second [V, D] buffer
                grad = grad if grad.dtype == dtype else grad.to(dtype)
            out.append(grad)
        return out[0], out[1], out[2], None, None, None


def weighted_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                  token_weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                                  ignore_index: int = -100, backend: str = "auto"
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum_n token_weight[n] * loss_n, loss [N] detached): loss_n the cross-entropy of token n (0 if ignored).

    hidden [N, D], weight [V, D], bias [V] (optional), target [N] int64, token_weight [N] floating (constants:
    no gradient flows into them). Backends as ``linear_cross_entropy``; on the torch path the gradients are
    computed in the forward (a second backward through the same graph recomputes them).
    """
    check_tensor(OP, "hidden", hidden, ndim=2, floating=True)
    check_head(OP, hidden, weight, bias)
    check_tensor(OP, "target", target, ndim=1, integer=True)
    check_tensor(OP, "token_weight", token_weight, ndim=1, floating=True)
    if token_weight.requires_grad:
        raise ValueError(f"{OP}: token_weight must not require grad (it is a constant per-token scale)")
    if target.shape[0] != hidden.shape[0] or token_weight.shape[0] != hidden.shape[0]:
        raise ValueError(f"{OP}: target and token_weight must have shape [N] = [{hidden.shape[0]}], got "
                         f"{tuple(target.shape)} and {tuple(token_weight.shape)}")
    check_same_device(OP, hidden=hidden, target=target, token_weight=token_weight)
    ignore_index = as_int(OP, "ignore_index", ignore_index)
    resolved = _backend.choose(OP, backend, hidden.device)
    if resolved != "torch" or not torch.is_grad_enabled():
        per_token = linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                         reduction="none", backend=backend)
        return (per_token * token_weight.to(per_token.dtype)).sum(), per_token.detach()
    check_target_values(OP, "target", target, weight.shape[0], ignore_index)
    total, per_token = _PrecomputedWeightedCE.apply(hidden, weight, bias, target, token_weight.detach(),
                                                    ignore_index)
    return total, per_token


def mean_objectives_on_one_head(hidden_sets, weight: torch.Tensor, target: torch.Tensor, scales, *,
                                bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                backend: str = "auto"):
    """sum_k scales[k] * (mean cross-entropy of hidden_sets[k] [N, D] predicting the same ``target`` [N]) in one
    ``weighted_linear_cross_entropy`` call, and each objective's mean (detached). Every set predicts the same
    targets (e.g. generation and reconstruction of one text); ignored tokens count in no mean."""
    valid = target != ignore_index
    count = valid.sum()
    token_weight = torch.cat([torch.where(valid, scale / count.clamp_min(1), 0.0) for scale in scales])
    hidden = torch.cat(list(hidden_sets))
    total, per_token = weighted_linear_cross_entropy(hidden, weight, target.repeat(len(hidden_sets)), token_weight,
                                                     bias=bias, ignore_index=ignore_index, backend=backend)
    return total, [part.sum() / count for part in per_token.split(target.numel())]
