"""Public API of the fused linear + cross-entropy op: functional API and nn.Module.

``linear_cross_entropy(hidden, weight, target)`` equals
``F.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` (plus the optional softcap and z-loss, see
``reference.py``) without ever holding the [N, V] logits. ``prefix_reconstruction_loss`` decodes text from an
embedding prefix through the same op, shifting by index instead of copying ``hidden``.

Layout: ``arguments.py`` (checks), ``custom_ops.py`` (the custom ops and their autograd rule), this file (options
composed at the op level: class weights, the z-loss and accuracy outputs, ``shift``), ``vocab_parallel.py``
(``process_group=``: the weight split over the vocabulary).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from .._autocast import autocast_inputs
from .._validation import check_same_device, check_tensor
from . import arguments as _args
from .arguments import resolve_filter_eps  # noqa: F401  (public helper; triton_impl's docs point here)
from .custom_ops import linear_cross_entropy_op, n_valid, reduce_tokens
from .reference import compute_dtype

OP = "linear_cross_entropy"
PREFIX_OP = "prefix_reconstruction_loss"
# see ``run``: a differentiable lse (no smoothing) recomputes in one merged backward instead of precomputing
PRECOMPUTE_SKIPPED_FOR_LSE = True
# fp32 logits per chunk of the token-accuracy pass
ACCURACY_CHUNK_BYTES = 8 * 2 ** 20


def _triton_impl():
    from . import triton_impl  # imported lazily: triton is optional for the CPU path

    return triton_impl


def _resolve_backend(op: str, backend: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    if hidden.device.type == "meta":  # shape inference: every backend's fake implementation is the same
        return "triton" if backend == "triton" else _backend.choose(op, backend, hidden.device)

    def triton_rejects():
        return _triton_impl().unsupported_reason(hidden, weight)

    return _backend.choose(op, backend, hidden.device, triton_rejects)


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """A last dimension of size 0/1 may carry any stride (the tensor is still ``is_contiguous()``); the kernels
    read it with stride 1, so give it that (the same memory)."""
    if t.shape[-1] <= 1 and t.stride(-1) != 1:
        return t.as_strided(t.shape, t.stride()[:-1] + (1,), t.storage_offset())
    return t


def _grad_flags(hidden, weight, bias):
    enabled = torch.is_grad_enabled()
    return (enabled and hidden.requires_grad, enabled and weight.requires_grad,
            enabled and bias is not None and bias.requires_grad)


def run(hidden2d, weight, target1d, row_index, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
        backend, filter_eps="auto", accum_dtype=None, vocab_order=False, lse_grad=False):
    """The custom op on 2-D hidden states: (loss, lse [N]). ``lse_grad``: lse is differentiable (costs a
    backward pass, or an O(N D) gather, only when its gradient is used)."""
    need_hidden, need_weight, need_bias = _grad_flags(hidden2d, weight, bias)
    # The torch path's forward precomputes the loss's gradients (3 matmuls in all). A differentiable lse without
    # label smoothing skips that: its gradient merges with the loss's into one recomputing backward (4 matmuls,
    # not 3 + 3); with smoothing the lse needs a pass of its own either way.
    merge_lse = lse_grad and not label_smoothing and PRECOMPUTE_SKIPPED_FOR_LSE
    precompute = (backend == "torch" and reduction != "none" and (need_hidden or need_weight or need_bias)
                  and not merge_lse)
    loss, stats, _, _, _ = linear_cross_entropy_op(
        hidden2d, weight, target1d, row_index, bias, ignore_index, reduction, float(label_smoothing),
        float(z_loss), None if softcap is None else float(softcap), backend, precompute, need_hidden,
        need_weight, need_bias, _args.resolve_filter_eps(filter_eps, hidden2d.dtype), accum_dtype,
        bool(vocab_order), bool(lse_grad))
    if not lse_grad:
        stats = stats.detach()
    return loss, stats[0] + stats[1]


def token_correct(states_fn, weight, bias, target, ignore_index) -> torch.Tensor:
    """1.0 where argmax_j logits[n, j] (first maximum, as ``torch.argmax``) is the target, else 0 (0 at ignored
    tokens); a chunked pass over the logits without gradients (the soft-cap is monotonic: raw logits suffice).
    ``states_fn(start, stop)`` returns the hidden rows of tokens [start, stop)."""
    acc = compute_dtype(weight.dtype)
    n_tokens, vocab = target.numel(), weight.shape[0]
    correct = torch.zeros(n_tokens, dtype=acc, device=weight.device)
    rows = max(1, ACCURACY_CHUNK_BYTES // (4 * vocab))
    with torch.no_grad():
        weight_acc = weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        for start in range(0, n_tokens, rows):
            stop = min(start + rows, n_tokens)
            best = F.linear(states_fn(start, stop).to(acc), weight_acc, bias_acc).argmax(1)
            correct[start:stop] = (best == target[start:stop]).to(acc)
    return torch.where(target != ignore_index, correct, torch.zeros_like(correct))


def _shift_rows(lead: int, seq_len: int, shift: int, device) -> torch.Tensor:
    """Row index of the shifted tokens into the [lead * T, D] view: token (b, l), l < T - shift, reads row b T + l."""
    return ((torch.arange(lead, device=device) * seq_len).unsqueeze(1)
            + torch.arange(seq_len - shift, device=device).unsqueeze(0)).reshape(-1)


def _check_shift(shift, hidden) -> int:
    if shift is True or shift is False or type(shift).__name__ == "bool_":
        shift = int(shift)
    shift = _args.as_int(OP, "shift", shift)
    if shift == 0:
        return 0
    if hidden.dim() < 2 or not 0 <= shift < hidden.shape[-2]:
        raise ValueError(f"{OP}: shift must be an int in [0, T) with T = hidden.shape[-2] (hidden [..., T, D]), "
                         f"got shift={shift} for hidden shape {tuple(hidden.shape)}")
    return shift


def _compose(hidden2d, weight, target, row_index, bias, *, ignore_index, reduction, label_smoothing, z_loss,
             softcap, backend, filter_eps, accum_dtype, vocab_order, ce_weight, process_group, want_lse,
             want_z, want_accuracy, states_fn):
    """Loss and the requested extras on flat tokens: returns (loss, lse, z_part, accuracy) (None where not asked).

    Plain case: one custom op call (its lse differentiable only when returned). Class weights, or z-loss/lse
    outputs with process_group, compose per-token losses with the differentiable lse at the op level."""
    z_part = accuracy = None
    if process_group is not None:
        from .vocab_parallel import vocab_parallel_per_token
        ce_tok, lse = vocab_parallel_per_token(hidden2d, weight, target, row_index, bias, ignore_index, softcap,
                                               backend, process_group, filter_eps, accum_dtype, vocab_order)
        per_tok = ce_tok + z_loss * lse.square() if z_loss else ce_tok
        loss = reduce_tokens(per_tok, target, ignore_index, reduction)
    elif ce_weight is not None:
        ce_tok, lse = run(hidden2d, weight, target, row_index, bias, ignore_index, "none", 0.0, 0.0, softcap,
                          backend, filter_eps, accum_dtype, vocab_order, lse_grad=True)
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        token_weight = torch.where(valid, ce_weight.to(ce_tok.dtype).index_select(0, safe),
                                   torch.zeros((), dtype=ce_tok.dtype, device=ce_tok.device))
        weighted = token_weight * ce_tok
        if reduction == "none":
            loss = weighted
        elif reduction == "sum":
            loss = weighted.sum()
        else:  # torch's rule: normalised by the summed weights of the valid tokens
            loss = weighted.sum() / token_weight.sum()
        if z_loss:
            loss = loss + z_loss * reduce_tokens(lse.square(), target, ignore_index, reduction)
    else:
        lse_grad = want_lse or want_z
        loss, lse = run(hidden2d, weight, target, row_index, bias, ignore_index, reduction, label_smoothing,
                        z_loss, softcap, backend, filter_eps, accum_dtype, vocab_order, lse_grad=lse_grad)
    if want_z:
        z_part = z_loss * reduce_tokens(lse.square(), target, ignore_index, reduction)
    if want_accuracy:
        correct = token_correct(states_fn, weight, bias, target, ignore_index)
        accuracy = correct if reduction == "none" else correct.sum() / n_valid(target, ignore_index)
    return loss, lse, z_part, accuracy


# ------------------------------------------------------------------------------------------------- public API

@autocast_inputs("hidden", "weight", "bias")
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                         return_lse: bool = False, backend: str = "auto", filter_eps="auto",
                         accum_dtype: Optional[str] = None, vocab_order: bool = False,
                         ce_weight: Optional[torch.Tensor] = None, shift: int = 0, return_z_loss: bool = False,
                         return_token_accuracy: bool = False, process_group=None):
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` against ``target`` without holding the logits.

    hidden [..., D] (fp32/fp16/bf16/fp64; D = 0 gives log V like torch), weight [V, D], bias [V] (optional),
    target [...] int64 class indices (``ignore_index``, a Python or numpy int, marks tokens to skip). Options as
    ``F.cross_entropy`` plus ``z_loss`` (adds z_loss * lse^2 per token) and ``softcap`` (logits ->
    softcap * tanh(logits / softcap) first). Logits are accumulated in fp32; the loss is fp32 (fp64 for fp64
    inputs). ``reduction="mean"`` over zero valid tokens is NaN, as in ``F.cross_entropy``.

    Returns the loss (scalar, or shaped like ``target`` for ``reduction="none"``), followed, in this order, by
    the outputs asked for:
      ``return_lse``            per-token log-sum-exp of the logits (fp32, shaped like ``target``, 0 at ignored
                                tokens), differentiable: ``loss + f(lse)`` trains through it (the lse gradient
                                costs one plain cross-entropy backward, or only an O(N D) gather when it merges
                                with the loss's backward: no label smoothing);
      ``return_z_loss``         the z-loss part of the loss, z_loss * lse^2 reduced like the loss (logging);
      ``return_token_accuracy`` 1.0/0.0 per token ("none") or the fraction of valid tokens whose first argmax
                                logit is the target (NaN with none valid); an extra chunked logits pass, no grad.

    ``ce_weight`` [V]: class weights with ``F.cross_entropy(weight=)``'s semantics (token n's cross-entropy times
    ce_weight[t_n]; "mean" divides by the summed weights of the valid tokens); the z-loss term stays unweighted
    (per valid token, "mean" over their count); not with ``label_smoothing`` (ValueError). ``shift`` (int or bool):
    next-token prediction without a copy: hidden [..., T, D] at position l predicts target[..., l + shift]; the
    last ``shift`` positions predict nothing ("none" and lse are 0 there). ``process_group``: vocabulary-parallel
    (tensor-parallel LM head): ``weight``/``bias`` are this rank's shard, rows [rank V_r, (rank + 1) V_r) of the
    vocabulary (equal shards: pad the vocabulary to a multiple of the world size), ``hidden`` and ``target``
    (global class indices) are the same on every rank; lse and the target logit are reduced across the group,
    every rank returns the full loss, ``hidden.grad`` is the full gradient (all-reduced in the backward) and
    ``weight.grad`` this shard's slice; not with ``label_smoothing``, ``ce_weight`` or ``return_token_accuracy``.

    Autograd: on the torch path (CPU) with "mean"/"sum" the gradients are computed in the forward's chunk pass
    and the first backward consumes them; a second backward through the same graph (``retain_graph=True``)
    recomputes them. ``create_graph=True`` (double backward: gradient penalties, Hessian-vector products) is
    supported by differentiating the reference formulas, which materialise the [N, V] logits.

    Triton backward options: ``filter_eps`` ("auto" = eps(dtype)/32 for fp16/bf16 inputs, 0 for fp32: exact)
    skips (token x vocabulary) tiles whose logits gradient (before the upstream gradient) is below it everywhere
    — what is dropped is each skipped entry's p_nj times a weight/hidden row, i.e. softmax mass below
    eps(dtype)/32 per entry; ``accum_dtype="fp32"`` (or ``torch.float32``) accumulates an fp16/bf16 dWeight in one
    fp32 [V, D] buffer (default: fp32 sums kept inside the gradient's own unwritten rows, so the backward holds
    the two gradients and little else; docs/linear_ce_options.md); ``vocab_order=True`` walks
    the classes by descending mean logit over the batch so that filtered tiles cluster. Under
    ``torch.use_deterministic_algorithms(True)`` the backward runs without atomics (bitwise reproducible).
    """
    _args.check_head(OP, hidden, weight, bias)
    check_tensor(OP, "target", target, integer=True)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{OP}: target must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    check_same_device(OP, hidden=hidden, target=target)
    ignore_index = _args.check_options(OP, ignore_index, reduction, label_smoothing, z_loss, softcap)
    accum_dtype = _args.check_backward_options(OP, filter_eps, accum_dtype)
    flags = [_args.check_flag(OP, name, value) for name, value in (
        ("return_lse", return_lse), ("return_z_loss", return_z_loss),
        ("return_token_accuracy", return_token_accuracy), ("vocab_order", vocab_order))]
    return_lse, return_z_loss, return_token_accuracy, vocab_order = flags
    _args.check_class_weight(OP, ce_weight, weight.shape[0], hidden, label_smoothing)
    shift = _check_shift(shift, hidden)
    vocab = weight.shape[0]
    if process_group is not None:
        from .vocab_parallel import check_process_group
        vocab = check_process_group(OP, process_group, weight, label_smoothing=label_smoothing,
                                    ce_weight=ce_weight, return_token_accuracy=return_token_accuracy)
    _args.check_target_values(OP, "target", target, vocab, ignore_index)
    dim = hidden.shape[-1]
    hidden2d = unit_last_stride(hidden.reshape(target.numel(), dim))
    weight = unit_last_stride(weight)
    resolved = _resolve_backend(OP, backend, hidden2d, weight)

    seq_len = hidden.shape[-2] if shift else 1
    lead = target.numel() // seq_len if seq_len else 0
    if shift:
        row_index = _shift_rows(lead, seq_len, shift, hidden.device)
        flat_target = target.reshape(lead, seq_len)[:, shift:].reshape(-1).long()
    else:
        row_index = None
        flat_target = target.reshape(-1).long()

    def states_fn(start, stop):
        return hidden2d[start:stop] if row_index is None else hidden2d.index_select(0, row_index[start:stop])

    loss, lse, z_part, accuracy = _compose(
        hidden2d, weight, flat_target, row_index, bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=resolved, filter_eps=filter_eps,
        accum_dtype=accum_dtype, vocab_order=vocab_order, ce_weight=ce_weight, process_group=process_group,
        want_lse=return_lse, want_z=return_z_loss, want_accuracy=return_token_accuracy, states_fn=states_fn)

    def per_token_shape(values):
        if shift:
            values = F.pad(values.reshape(lead, seq_len - shift), (0, shift))
        return values.reshape(target.shape)

    if reduction == "none":
        loss = per_token_shape(loss)
        if accuracy is not None:
            accuracy = per_token_shape(accuracy)
        if z_part is not None:
            z_part = per_token_shape(z_part)
    extras = [per_token_shape(lse) if return_lse else None, z_part, accuracy]
    extras = [value for value in extras if value is not None]
    return (loss, *extras) if extras else loss


@autocast_inputs("hidden", "weight", "bias")
def prefix_reconstruction_loss(hidden: torch.Tensor, weight: torch.Tensor, text_ids: torch.Tensor, *,
                               prefix_len: int, pad_id: Optional[int] = None, bias: Optional[torch.Tensor] = None,
                               reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
                               filter_eps="auto", accum_dtype: Optional[str] = None, vocab_order: bool = False):
    """LM loss of decoding ``text_ids`` after an embedding prefix, from the decoder states ``hidden``.

    hidden [B, T, D]: states of the sequence [prefix (``prefix_len`` positions) + text]; text_ids [B, L] with
    1 <= L <= T - prefix_len. The state at position prefix_len - 1 + l predicts text_ids[:, l]; tokens equal to
    ``pad_id`` are ignored. The shift is a row-index map into ``hidden`` (no copy of the states).
    ``reduction="none"`` returns [B, L]; ``return_lse=True`` also returns the differentiable per-token lse [B, L]
    (0 at padding). Other options as in :func:`linear_cross_entropy`.
    """
    _args.check_head(PREFIX_OP, hidden, weight, bias)
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
    pad_id = _args.as_int(PREFIX_OP, "pad_id", pad_id, allow_none=True)
    _args.check_options(PREFIX_OP, -100, reduction, label_smoothing, z_loss, softcap)
    accum_dtype = _args.check_backward_options(PREFIX_OP, filter_eps, accum_dtype)
    return_lse = _args.check_flag(PREFIX_OP, "return_lse", return_lse)
    _args.check_target_values(PREFIX_OP, "text_ids", text_ids, weight.shape[0], pad_id)
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
    loss, lse = run(hidden2d, weight, target, row_index, bias, ignore_index, reduction, label_smoothing, z_loss,
                    softcap, resolved, filter_eps, accum_dtype, vocab_order, lse_grad=return_lse)
    if reduction == "none":
        loss = loss.reshape(batch, text_len)
    if return_lse:
        return loss, lse.reshape(batch, text_len)
    return loss


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_cross_entropy`; holds the options. ``forward(hidden, weight, target, bias)``."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: Optional[float] = None, return_lse: bool = False,
                 backend: str = "auto", filter_eps="auto", accum_dtype: Optional[str] = None,
                 vocab_order: bool = False, ce_weight: Optional[torch.Tensor] = None, shift: int = 0,
                 return_z_loss: bool = False, return_token_accuracy: bool = False, process_group=None):
        super().__init__()
        self.ignore_index = _args.check_options(type(self).__name__, ignore_index, reduction, label_smoothing,
                                                z_loss, softcap)
        _args.check_backward_options(type(self).__name__, filter_eps, accum_dtype)
        options = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                       return_lse=return_lse, backend=backend, filter_eps=filter_eps, accum_dtype=accum_dtype,
                       vocab_order=vocab_order, shift=shift, return_z_loss=return_z_loss,
                       return_token_accuracy=return_token_accuracy, process_group=process_group)
        for name, value in options.items():
            setattr(self, name, value)
        self._option_names = tuple(options)
        self.ce_weight = ce_weight  # not a buffer: the caller owns it (like F.cross_entropy's weight)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        return linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=self.ignore_index,
                                    ce_weight=self.ce_weight,
                                    **{name: getattr(self, name) for name in self._option_names})

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
