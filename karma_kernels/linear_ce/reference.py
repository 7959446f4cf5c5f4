"""The oracle for the fused linear + cross-entropy op: naive, materialises the full [N, V] logits.

Semantics (this file is their documentation). For hidden ``x`` [N, D], weight ``W`` [V, D], optional bias
``b`` [V], target ``t`` [N]:

    y_i   = x_i @ W.T + b                                       (computed in fp32 for fp16/bf16 inputs)
    z_i   = softcap * tanh(y_i / softcap)  if softcap else y_i
    lse_i = logsumexp_j z_ij
    ce_i  = lse_i - (1 - eps) * z_i[t_i] - (eps / V) * sum_j z_ij          (eps = label_smoothing)
    loss_i = ce_i + z_loss * lse_i ** 2                                      (the z-loss is per token)

Tokens whose target equals ``ignore_index`` contribute nothing (loss_i = 0, no gradient; a NaN/inf in their
hidden row reaches neither the loss nor any gradient). Reductions:
``"none"`` returns loss_i shaped like ``target`` (0 at ignored tokens), ``"sum"`` the sum over tokens,
``"mean"`` the sum divided by the number of non-ignored tokens — exactly ``F.cross_entropy``'s rule, so when
every token is ignored (or there are no tokens) ``"mean"`` is NaN (0 / 0, as torch 2.13's ``F.cross_entropy``
returns) with zero gradients, and ``"sum"`` is 0. The z-loss term is reduced the same way as the
cross-entropy term. ``lse`` (with ``return_lse``) is fp32 (fp64 for fp64 inputs), shaped like ``target``,
and 0 at ignored tokens (the fused paths skip them).

The loss is fp32 for fp16/bf16/fp32 inputs (fp64 for fp64). So the ce_i part equals
``F.cross_entropy(z, t, ignore_index=..., reduction=..., label_smoothing=eps)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits and the loss are fp32 for every input dtype except fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ignored_rows_zeroed(states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """An ignored token contributes nothing, not even a NaN/inf gradient from its hidden row (0 x NaN)."""
    return torch.where(valid.unsqueeze(-1), states, torch.zeros((), dtype=states.dtype, device=states.device))


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                                   bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                                   softcap: Optional[float] = None, return_lse: bool = False):
    acc = compute_dtype(hidden.dtype)
    flat_target = target.reshape(-1)
    valid = flat_target != ignore_index
    states = _ignored_rows_zeroed(hidden.reshape(target.numel(), hidden.shape[-1]).to(acc), valid)
    logits = F.linear(states, weight.to(acc), None if bias is None else bias.to(acc))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, flat_target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(logits, dim=-1)
    if z_loss:
        loss = loss + z_loss * torch.where(valid, lse.square(), torch.zeros_like(lse))
    if reduction == "none":
        loss = loss.reshape(target.shape)
    elif reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.sum() / valid.sum()
    if return_lse:
        return loss, torch.where(valid, lse, torch.zeros_like(lse)).reshape(target.shape)
    return loss


def prefix_reconstruction_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, text_ids: torch.Tensor, *,
                                         prefix_len: int, pad_id: Optional[int] = None,
                                         bias: Optional[torch.Tensor] = None, reduction: str = "mean",
                                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                                         softcap: Optional[float] = None):
    """hidden [B, T, D] holds states of [prefix (prefix_len positions) + text (L = T - prefix_len tokens)].

    The state at position prefix_len - 1 + l predicts text_ids[:, l], so the last position predicts nothing.
    Tokens equal to ``pad_id`` are ignored. ``"none"`` returns [B, L].
    """
    text_len = text_ids.shape[1]
    states = hidden[:, prefix_len - 1: prefix_len - 1 + text_len]
    target = text_ids.clone()
    ignore_index = -100
    if pad_id is not None:
        target[text_ids == pad_id] = ignore_index
    return linear_cross_entropy_reference(states, weight, target, bias=bias, ignore_index=ignore_index,
                                          reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                                          softcap=softcap)


def linear_cross_entropy_reference_grads(grad_scale: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                         target: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                                         ignore_index: int = -100, label_smoothing: float = 0.0,
                                         z_loss: float = 0.0, softcap: Optional[float] = None):
    """Gradients of sum_n grad_scale_n * loss_n (loss as above, reduction "none"), materialised in closed form:

        dloss_n/dz_nj = (p_nj - (1 - eps) [j == t_n] - eps / V) + 2 z_loss lse_n p_nj    (0 for ignored tokens)
        dz/dy = 1 - tanh(y / softcap)^2 with a softcap;  dHidden = dy @ W, dWeight = dy^T @ x, dBias = sum_n dy.

    Used by the op's backend="reference" backward (autograd is not available inside a custom op's kernel);
    tests check it, like every backend, against autograd through ``linear_cross_entropy_reference``.
    """
    acc = compute_dtype(hidden.dtype)
    valid = target != ignore_index
    x = _ignored_rows_zeroed(hidden.to(acc), valid)
    w = weight.to(acc)
    y = F.linear(x, w, None if bias is None else bias.to(acc))
    vocab = w.shape[0]
    z = softcap * torch.tanh(y / softcap) if softcap is not None else y
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    onehot = F.one_hot(safe_target, vocab).to(acc)
    probs = torch.exp(z - lse)
    # the z-loss term added last: p (1 + 2 z lse) - 1 would lose it to cancellation when p_t ~ 1 (V = 1)
    dz = (probs - (1 - label_smoothing) * onehot - label_smoothing / vocab) + probs * (2 * z_loss * lse)
    scale = torch.where(valid, grad_scale.to(acc).expand(target.shape), torch.zeros((), dtype=acc))
    dy = dz * scale.unsqueeze(-1)
    if softcap is not None:
        dy = dy * (1 - torch.tanh(y / softcap).square())
    grad_hidden = (dy @ w).to(hidden.dtype)
    grad_weight = (dy.T @ x).to(weight.dtype)
    grad_bias = None if bias is None else dy.sum(0).to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
