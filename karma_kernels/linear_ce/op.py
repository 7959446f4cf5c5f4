"""Public API of the fused linear + cross-entropy op: custom ops, functional API, nn.Module.

``linear_cross_entropy(hidden, weight, target)`` equals
``F.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` (plus the optional softcap and z-loss, see
``reference.py``) without ever holding the [N, V] logits. ``prefix_reconstruction_loss`` decodes text from an
embedding prefix through the same op, shifting by index instead of copying ``hidden``.

Two custom ops carry the work so that ``torch.compile`` treats them as opaque:
  ``karma::linear_cross_entropy``           loss (reduced), per-token softmax statistics [2, N] (row max and the
                                            log-sum-exp relative to it; lse = their sum), and — on the torch
                                            path with a scalar
                                            reduction — the gradients for a unit upstream gradient, computed in
                                            the same chunk pass (3 matmuls per chunk instead of 4)
  ``karma::linear_cross_entropy_backward``  the gradients recomputed from the saved inputs and statistics (reduction
                                            "none", and the Triton path)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _backend
from .._autocast import autocast_inputs
from .._validation import check_reduction, check_same_device, check_tensor
from . import reference as _reference
from . import torch_impl as _torch_impl

OP = "linear_cross_entropy"
PREFIX_OP = "prefix_reconstruction_loss"


def _triton_impl():
    from . import triton_impl  # imported lazily: triton is optional for the CPU path

    return triton_impl


def _n_valid(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (target != ignore_index).sum()


def _reduce(per_token: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / _n_valid(target, ignore_index)  # 0 / 0 = NaN when every token is ignored, as F.cross_entropy


def _reference_per_token(hidden, weight, target, row_index, bias, ignore_index, label_smoothing, z_loss, softcap):
    states = hidden if row_index is None else hidden.index_select(0, row_index)
    return _reference.linear_cross_entropy_reference(
        states, weight, target, bias=bias, ignore_index=ignore_index, reduction="none",
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, return_lse=True)


def _no_grad(like: torch.Tensor) -> torch.Tensor:
    """Placeholder for a gradient that was not asked for (custom ops cannot return None)."""
    return like.new_empty((0,))


@torch.library.custom_op("karma::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, row_index: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
    softcap: Optional[float], backend: str, precompute_grads: bool, need_grad_hidden: bool,
    need_grad_weight: bool, need_grad_bias: bool, filter_eps: float = 0.0, accum_dtype: Optional[str] = None,
    vocab_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [R, D], target [N] -> (loss, softmax_stats [2, N], grad_hidden, grad_weight, grad_bias).

    Gradients are empty unless ``precompute_grads`` (torch backend, reduction mean/sum): then they are the
    gradients of the reduced loss for an upstream gradient of 1, in the accumulation dtype (fp32 for fp16/bf16:
    cast only after the backward's scaling, or an fp16 gradient overflows), and the backward only scales them.
    ``filter_eps``, ``accum_dtype`` and ``vocab_order`` are options of the Triton backward (carried here for autograd).
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
            n_valid = int(_n_valid(target, ignore_index))
            grad_scale = 1.0 if reduction == "sum" else 1.0 / max(n_valid, 1)
        per_token, lse, gh, gw, gb = _torch_impl.chunked_linear_cross_entropy(
            hidden, weight, target, row_index=row_index, bias=bias, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, grad_scale=grad_scale,
            need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight,
            need_grad_bias=need_grad_bias, cast_grads=False)
        stats = torch.stack([lse, torch.zeros_like(lse)])
        grad_hidden = gh if gh is not None else grad_hidden
        grad_weight = gw if gw is not None else grad_weight
        grad_bias = gb if gb is not None else grad_bias
    loss = _reduce(per_token, target, ignore_index, reduction)
    return loss, stats, grad_hidden, grad_weight, grad_bias


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, target, row_index, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, backend,
      precompute_grads, need_grad_hidden, need_grad_weight, need_grad_bias, filter_eps=0.0, accum_dtype=None,
      vocab_order=False):
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
def _linear_cross_entropy_backward_op(
    grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
    row_index: Optional[torch.Tensor], bias: Optional[torch.Tensor], stats: torch.Tensor, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float], backend: str,
    need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool, filter_eps: float = 0.0,
    accum_dtype: Optional[str] = None, vocab_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients recomputed from the inputs (and, on the Triton path, the forward's softmax statistics).
    Unneeded ones come back empty."""
    if reduction == "mean":
        grad_scale = grad_loss / _n_valid(target, ignore_index).clamp_min(1)
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


@_linear_cross_entropy_backward_op.register_fake
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


def _setup_context(ctx, inputs, output):
    (hidden, weight, target, row_index, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, backend,
     precompute_grads, need_grad_hidden, need_grad_weight, need_grad_bias, filter_eps, accum_dtype,
     vocab_order) = inputs
    _, stats, grad_hidden, grad_weight, grad_bias = output
    ctx.precomputed = precompute_grads and reduction != "none" and backend == "torch"
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap, backend, filter_eps, accum_dtype,
                   vocab_order)
    ctx.has_bias = bias is not None
    if ctx.precomputed:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        # the precomputed gradients are cast to their inputs' dtypes after scaling
        ctx.grad_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    else:
        ctx.save_for_backward(hidden, weight, target, row_index, bias, stats)


def _backward(ctx, grad_loss, grad_stats, *unused_grad_outputs):
    # the lse built from the statistics is returned detached by the public API: it carries no gradient.
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
    need_bias = need_bias and ctx.has_bias
    grads = [None] * 18
    if ctx.precomputed:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # In place in eager mode: no second [V, D] buffer (a second backward through the graph then fails
        # autograd's saved-tensor version check: the buffers were consumed). Out of place while tracing
        # (torch.compile / AOT autograd / functorch hand subclass tensors), which cannot take the mutation.
        eager = (not torch.compiler.is_compiling() and type(grad_loss) is torch.Tensor
                 and all(type(t) is torch.Tensor for t in (grad_hidden, grad_weight, grad_bias)))
        multiply = (lambda t: t.mul_(grad_loss)) if eager else (lambda t: t * grad_loss)

        def scale(t, dtype):  # in the accumulation dtype, then cast to the input's dtype
            t = multiply(t)
            return t if t.dtype == dtype else t.to(dtype)

        hidden_dtype, weight_dtype, bias_dtype = ctx.grad_dtypes
        if need_hidden:
            grads[0] = scale(grad_hidden, hidden_dtype)
        if need_weight:
            grads[1] = scale(grad_weight, weight_dtype)
        if need_bias:
            grads[4] = scale(grad_bias, bias_dtype)
        return tuple(grads)
    hidden, weight, target, row_index, bias, stats = ctx.saved_tensors
    (ignore_index, reduction, label_smoothing, z_loss, softcap, backend, filter_eps, accum_dtype,
     vocab_order) = ctx.options
    grad_hidden, grad_weight, grad_bias = _linear_cross_entropy_backward_op(
        grad_loss, hidden, weight, target, row_index, bias, stats, ignore_index, reduction, label_smoothing, z_loss,
        softcap, backend, need_hidden, need_weight, need_bias, filter_eps, accum_dtype, vocab_order)
    if need_hidden:
        grads[0] = grad_hidden
    if need_weight:
        grads[1] = grad_weight
    if need_bias:
        grads[4] = grad_bias
    return tuple(grads)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------- checks

def _check_options(op: str, ignore_index, reduction, label_smoothing, z_loss, softcap) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    check_reduction(op, reduction)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not 0.0 <= float(z_loss) < float("inf"):
        raise ValueError(f"{op}: z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not 0.0 < float(softcap) < float("inf")):
        raise ValueError(f"{op}: softcap must be None or a finite float > 0, got {softcap!r}")


def _check_backward_options(op: str, filter_eps, accum_dtype) -> None:
    if filter_eps != "auto" and (isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float))
                                 or not 0.0 <= float(filter_eps) < float("inf")):
        raise ValueError(f"{op}: filter_eps must be \"auto\" or a finite float >= 0, got {filter_eps!r}")
    if accum_dtype not in (None, "fp32"):
        raise ValueError(f"{op}: accum_dtype must be None or \"fp32\", got {accum_dtype!r}")


def resolve_filter_eps(filter_eps, dtype: torch.dtype) -> float:
    """The "auto" gradient filter: eps(dtype) / 32 for fp16/bf16 (2^-15 and 2^-12), 0 (exact) otherwise. An
    entry below it, times a weight or hidden row, is below 1/32 of that row's rounding step in the gradient."""
    if filter_eps != "auto":
        return float(filter_eps)
    return torch.finfo(dtype).eps / 32 if dtype in (torch.float16, torch.bfloat16) else 0.0


def _check_head(op: str, hidden, weight, bias) -> None:
    check_tensor(op, "hidden", hidden, floating=True)
    check_tensor(op, "weight", weight, ndim=2, floating=True)
    if hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must have shape [..., D], got a 0-d tensor")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got weight shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight must have at least one row (V >= 1), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    check_same_device(op, hidden=hidden, weight=weight, bias=bias)


def _check_target_values(op: str, name: str, target: torch.Tensor, vocab: int, ignored: Optional[int]) -> None:
    """Range check of the class indices. On CPU (outside compiled graphs) it raises ValueError at once; on a GPU
    reading values would sync the host, so a device-side assertion fails the stream instead (no silent
    out-of-range target that never matches a class)."""
    if target.numel() == 0:
        return
    if target.device.type != "cpu":
        in_range = (target >= 0) & (target < vocab)
        if ignored is not None:
            in_range |= target == ignored
        torch._assert_async(in_range.all(), f"{op}: {name} values must be in [0, {vocab})")
        return
    if torch.compiler.is_compiling():
        return
    real = target if ignored is None else target[target != ignored]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        bad = real[(real < 0) | (real >= vocab)][0]
        allowed = f" or ignore_index={ignored}" if ignored is not None else ""
        raise ValueError(f"{op}: {name} values must be in [0, {vocab}){allowed}; found {int(bad)}")


def _resolve_backend(op: str, backend: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    def triton_rejects():
        return _triton_impl().unsupported_reason(hidden, weight)

    return _backend.choose(op, backend, hidden.device, triton_rejects)


def _grad_flags(hidden, weight, bias):
    enabled = torch.is_grad_enabled()
    return (enabled and hidden.requires_grad, enabled and weight.requires_grad,
            enabled and bias is not None and bias.requires_grad)


def _run(hidden2d, weight, target1d, row_index, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
         backend, filter_eps="auto", accum_dtype=None, vocab_order=False):
    need_hidden, need_weight, need_bias = _grad_flags(hidden2d, weight, bias)
    precompute = backend == "torch" and reduction != "none" and (need_hidden or need_weight or need_bias)
    loss, stats, _, _, _ = _linear_cross_entropy_op(
        hidden2d, weight, target1d, row_index, bias, ignore_index, reduction, float(label_smoothing),
        float(z_loss), None if softcap is None else float(softcap), backend, precompute, need_hidden,
        need_weight, need_bias, resolve_filter_eps(filter_eps, hidden2d.dtype), accum_dtype, bool(vocab_order))
    stats = stats.detach()
    return loss, stats[0] + stats[1]


# ------------------------------------------------------------------------------------------------- public API

@autocast_inputs("hidden", "weight", "bias")
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                         return_lse: bool = False, backend: str = "auto", filter_eps="auto",
                         accum_dtype: Optional[str] = None, vocab_order: bool = False):
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` against ``target`` without holding the logits.

    hidden [..., D] (fp32/fp16/bf16/fp64), weight [V, D], bias [V] (optional), target [...] int64 class indices
    (``ignore_index`` marks tokens to skip). Options as ``F.cross_entropy`` plus ``z_loss`` (adds
    z_loss * lse^2 per token) and ``softcap`` (logits -> softcap * tanh(logits / softcap) first). Logits are
    accumulated in fp32; the loss is fp32 (fp64 for fp64 inputs). Returns the loss (scalar, or shaped like
    ``target`` for ``reduction="none"``), and with ``return_lse=True`` also the per-token log-sum-exp of the
    logits (fp32, shaped like ``target``, 0 at ignored tokens, no gradient). ``reduction="mean"`` over zero
    valid tokens is NaN, as in ``F.cross_entropy``.

    On the torch path (CPU) with "mean"/"sum", the gradients are computed in the forward's chunk pass and the
    first backward consumes them: backpropagating through the same graph twice (``retain_graph=True``) raises
    autograd's "modified by an inplace operation" error. ``reduction="none"`` recomputes and allows it.

    Triton backward options: ``filter_eps`` ("auto" = eps(dtype)/32 for fp16/bf16 inputs, 0 for fp32: exact)
    skips (token x vocabulary) tiles whose logits gradient (before the upstream gradient) is below it everywhere
    — what is dropped is each skipped entry's p_nj times a weight/hidden row, i.e. softmax mass below
    eps(dtype)/32 per entry; ``accum_dtype="fp32"`` accumulates an fp16/bf16 dWeight in one fp32 [V, D] buffer
    (default: fp32 bands of <= 16 MiB, each cast into the gradient); ``vocab_order=True`` walks the classes by
    descending mean logit over the batch so that filtered tiles cluster. Under
    ``torch.use_deterministic_algorithms(True)`` the backward runs without atomics (bitwise reproducible).
    """
    _check_head(OP, hidden, weight, bias)
    check_tensor(OP, "target", target, integer=True)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{OP}: target must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    check_same_device(OP, hidden=hidden, target=target)
    _check_options(OP, ignore_index, reduction, label_smoothing, z_loss, softcap)
    _check_backward_options(OP, filter_eps, accum_dtype)
    _check_target_values(OP, "target", target, weight.shape[0], ignore_index)
    resolved = _resolve_backend(OP, backend, hidden, weight)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    loss, lse = _run(hidden2d, weight, target.reshape(-1).long(), None, bias, ignore_index, reduction,
                     label_smoothing, z_loss, softcap, resolved, filter_eps, accum_dtype, vocab_order)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if return_lse:
        return loss, lse.reshape(target.shape)
    return loss


@autocast_inputs("hidden", "weight", "bias")
def prefix_reconstruction_loss(hidden: torch.Tensor, weight: torch.Tensor, text_ids: torch.Tensor, *,
                               prefix_len: int, pad_id: Optional[int] = None, bias: Optional[torch.Tensor] = None,
                               reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: Optional[float] = None, backend: str = "auto", filter_eps="auto",
                               accum_dtype: Optional[str] = None, vocab_order: bool = False) -> torch.Tensor:
    """LM loss of decoding ``text_ids`` after an embedding prefix, from the decoder states ``hidden``.

    hidden [B, T, D]: states of the sequence [prefix (``prefix_len`` positions) + text]; text_ids [B, L] with
    1 <= L <= T - prefix_len. The state at position prefix_len - 1 + l predicts text_ids[:, l]; tokens equal to
    ``pad_id`` are ignored. The shift is a row-index map into ``hidden`` (no copy of the states).
    ``reduction="none"`` returns [B, L]. Other options as in :func:`linear_cross_entropy`.
    """
    _check_head(PREFIX_OP, hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"{PREFIX_OP}: hidden must be 3-D [B, T, D], got shape {tuple(hidden.shape)}")
    check_tensor(PREFIX_OP, "text_ids", text_ids, ndim=2, integer=True)
    check_same_device(PREFIX_OP, hidden=hidden, text_ids=text_ids)
    batch, seq_len, _ = hidden.shape
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not 1 <= prefix_len < seq_len:
        raise ValueError(f"{PREFIX_OP}: prefix_len must be an int with 1 <= prefix_len < T = {seq_len}, "
                         f"got {prefix_len!r}")
    text_len = text_ids.shape[1]
    if text_ids.shape[0] != batch or not 1 <= text_len <= seq_len - prefix_len:
        raise ValueError(f"{PREFIX_OP}: text_ids must have shape [B, L] with B = {batch} and "
                         f"1 <= L <= T - prefix_len = {seq_len - prefix_len}, got {tuple(text_ids.shape)}")
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
        raise TypeError(f"{PREFIX_OP}: pad_id must be an int or None, got {pad_id!r}")
    _check_options(PREFIX_OP, -100, reduction, label_smoothing, z_loss, softcap)
    _check_backward_options(PREFIX_OP, filter_eps, accum_dtype)
    _check_target_values(PREFIX_OP, "text_ids", text_ids, weight.shape[0], pad_id)
    resolved = _resolve_backend(PREFIX_OP, backend, hidden, weight)

    ignore_index = -100 if pad_id != -100 else -101
    target = text_ids.reshape(-1).long()
    if pad_id is not None:
        target = target.masked_fill(target == pad_id, ignore_index)
    device = hidden.device
    # token (b, l) reads hidden[b, prefix_len - 1 + l]: a row map into the [B*T, D] view, not a copy
    row_index = ((torch.arange(batch, device=device) * seq_len).unsqueeze(1)
                 + torch.arange(prefix_len - 1, prefix_len - 1 + text_len, device=device).unsqueeze(0)).reshape(-1)
    hidden2d = hidden.reshape(batch * seq_len, hidden.shape[-1])
    loss, _ = _run(hidden2d, weight, target, row_index, bias, ignore_index, reduction, label_smoothing, z_loss,
                   softcap, resolved, filter_eps, accum_dtype, vocab_order)
    if reduction == "none":
        loss = loss.reshape(batch, text_len)
    return loss


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_cross_entropy`; holds the options. ``forward(hidden, weight, target, bias)``."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: Optional[float] = None, return_lse: bool = False,
                 backend: str = "auto", filter_eps="auto", accum_dtype: Optional[str] = None,
                 vocab_order: bool = False):
        super().__init__()
        _check_options(type(self).__name__, ignore_index, reduction, label_smoothing, z_loss, softcap)
        _check_backward_options(type(self).__name__, filter_eps, accum_dtype)
        self.filter_eps = filter_eps
        self.accum_dtype = accum_dtype
        self.vocab_order = vocab_order
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        return linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, return_lse=self.return_lse,
                                    backend=self.backend, filter_eps=self.filter_eps,
                                    accum_dtype=self.accum_dtype, vocab_order=self.vocab_order)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
