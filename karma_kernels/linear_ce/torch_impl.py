"""Chunked linear + cross-entropy in plain PyTorch: the path CPU users get.

Tokens are processed in chunks of ``chunk_rows``; only one chunk of fp32 logits exists at a time (see
``default_chunk_rows``: 8 MiB, or 128 rows when that is more and within 1/4 of the weight gradient's size).
For each chunk, one pass computes the loss and — when gradients are wanted — the gradient of the logits in the
same buffer, which two more matmuls turn into dHidden and dWeight (3 matmuls per chunk; the weight gradient
accumulates in one fp32 [V, D] buffer via ``addmm_``, written by the first chunk).

Speed: the three matmuls of a forward + backward are the floor (``bench/linear_ce_cpu_floor.py`` times the op
against them). Chunks hold at least 128 tokens when that fits in 1/4 of the weight gradient's size: with fewer,
each matmul has a small dimension and runs at about half the speed of its full-size twin, and every chunk
streams W twice and read-modify-writes dW once. The chunk's logits are token-major ([chunk, V]), so the softmax
reduces along contiguous rows; it takes four passes over the buffer (an in-place ``log_softmax``, then ``exp_``);
the one-hot term is a scatter into the buffer; the uniform gradient scale (1/n for "mean") rides on the
matmuls' ``alpha`` instead of a pass of its own.

Why token chunks and not vocabulary blocks: a vocabulary block's gradient needs each token's final lse, so
blocking over the vocabulary costs a fourth matmul (a first pass for the lse), 4/3 of the floor.

Ignored tokens: on CPU their positions are dropped before any compute (``nonzero`` syncs, which is free on
CPU); on other devices they are masked instead (their gradient rows are zeroed), so no host sync happens.

Hidden rows may be addressed through ``row_index`` ([N] int64, token n reads ``hidden[row_index[n]]``): this is
how the prefix-reconstruction loss shifts by the prefix length without copying ``hidden``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .reference import compute_dtype

# fp32 logits held per chunk: at most 1/8 of the weight gradient's size (the memory any method needs), within
# [1, 8] MiB — small enough for a last-level cache ...
MAX_LOGITS_CHUNK_BYTES = 8 * 2 ** 20
MIN_LOGITS_CHUNK_BYTES = 2 ** 20
# ... but at least this many rows when that stays within 1/4 of the weight gradient's size: below ~128 rows the
# three matmuls of a chunk (one dimension = the chunk) run at half the speed of full-size ones on 2-core x86
# (measured: bench/linear_ce_cpu_floor.py), and each chunk streams W twice and read-modify-writes dW once.
EFFICIENT_CHUNK_ROWS = 128
# Half-precision gradient tiles of the Triton kernels are scaled so that their largest entry lies in
# (2^(HEADROOM-1), 2^HEADROOM] before the cast (see ``emulate_grad_tile_cast``).
GRAD_TILE_HEADROOM = 14
# Chunks are a multiple of this many rows (matmul kernels block rows by 8/16).
CHUNK_ROW_MULTIPLE = 16


def default_chunk_rows(n_tokens: int, vocab: int, dim: int) -> int:
    vocab = max(vocab, 1)
    budget = min(MAX_LOGITS_CHUNK_BYTES, max(MIN_LOGITS_CHUNK_BYTES, vocab * dim * 4 // 8))
    rows = max(budget // (4 * vocab), min(EFFICIENT_CHUNK_ROWS, dim // 4))
    rows = max(CHUNK_ROW_MULTIPLE, rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)
    return max(1, min(rows, n_tokens))


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    row_index: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    grad_scale: Union[None, float, torch.Tensor] = None,
    need_grad_hidden: bool = False,
    need_grad_weight: bool = False,
    need_grad_bias: bool = False,
    chunk_rows: Optional[int] = None,
    compact: Optional[bool] = None,
    cast_grads: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-token loss and lse, and optionally the gradients of ``sum_n grad_scale_n * loss_n``.

    hidden [R, D] (R = N unless ``row_index`` maps tokens to rows), weight [V, D], target [N] int64, bias [V].
    ``grad_scale``: None (no gradients), a Python float (the same upstream gradient for every valid token, e.g.
    1/n_valid for "mean"), or a tensor of shape [] or [N] (per-token upstream gradient, "none" reduction).
    ``compact``: drop ignored tokens up front (default on CPU) or mask them (default elsewhere: no host sync).
    ``cast_grads=False`` leaves the gradients in the accumulation dtype (fp32 for fp16/bf16 inputs): for a caller
    that scales them later (the forward's unit-upstream gradients), so that the scale comes before the cast —
    cast first, an fp16 gradient above 65504 for a unit upstream is inf, however small the real upstream.

    Returns (loss [N], lse [N], grad_hidden [R, D] | None, grad_weight [V, D] | None, grad_bias [V] | None);
    loss and lse are fp32 (fp64 for fp64 inputs) and 0 at ignored tokens; gradients have their input's dtype
    (with ``cast_grads``).
    """
    device = hidden.device
    acc = compute_dtype(hidden.dtype)
    n_tokens = target.numel()
    vocab, dim = weight.shape
    want_grads = grad_scale is not None and (need_grad_hidden or need_grad_weight or need_grad_bias)

    loss = torch.zeros(n_tokens, dtype=acc, device=device)
    lse = torch.zeros(n_tokens, dtype=acc, device=device)
    grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=device) if want_grads and need_grad_hidden else None
    # written (not accumulated) by the first chunk: no zero-fill pass over [V, D]
    grad_weight = torch.empty((vocab, dim), dtype=acc, device=device) if want_grads and need_grad_weight else None
    grad_bias = (torch.zeros(vocab, dtype=acc, device=device)
                 if want_grads and need_grad_bias and bias is not None else None)

    # Which tokens to process: on CPU only the valid ones (a host sync is free there); elsewhere all, masked.
    valid = target != ignore_index
    if compact is None:
        compact = device.type == "cpu"
    if compact:
        positions = valid.nonzero().squeeze(1)
        if positions.numel() == n_tokens:
            positions = None  # every token valid: plain slices, no index copies
        n_work = n_tokens if positions is None else positions.numel()
    else:
        positions = None
        n_work = n_tokens
    if n_work == 0:
        if grad_weight is not None:
            grad_weight.zero_()
        return _finish(loss, lse, grad_hidden, grad_weight, grad_bias, hidden, weight, bias, cast_grads)

    # fp16/bf16 on the torch path: one fp32 copy of the weight (CPU low-precision matmuls are emulated and slow).
    weight_acc = weight if weight.dtype == acc else weight.to(acc)
    bias_acc = None if bias is None else (bias if bias.dtype == acc else bias.to(acc))
    rows_per_chunk = chunk_rows or default_chunk_rows(n_work, vocab, dim)
    # flat storage, viewed per chunk as a contiguous [count, V] block
    logits_storage = torch.empty(vocab * min(rows_per_chunk, n_work), dtype=acc, device=device)
    deriv_storage = torch.empty_like(logits_storage) if (softcap is not None and want_grads) else None

    # a Python-number scale rides on the matmuls' alpha; masked ignored rows need a per-row zero instead
    uniform_scale = want_grads and compact and isinstance(grad_scale, (float, int))
    if want_grads and not uniform_scale:
        grad_scale = torch.as_tensor(grad_scale, dtype=acc, device=device)
        if grad_scale.dim() == 0:
            grad_scale = grad_scale.expand(n_tokens)
    smoothing_keep = 1.0 - label_smoothing
    onehot_storage = torch.full((min(rows_per_chunk, n_work), 1), -smoothing_keep, dtype=acc, device=device)

    for start in range(0, n_work, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_work)
        count = stop - start
        if positions is None:
            tokens = slice(start, stop)
            target_chunk = target[start:stop]
        else:
            tokens = positions[start:stop]
            target_chunk = target.index_select(0, tokens)
        if compact:
            chunk_valid = None
        else:
            chunk_valid = valid[tokens]
            target_chunk = torch.where(chunk_valid, target_chunk, torch.zeros_like(target_chunk))
        rows = _rows_of(tokens, row_index)
        hidden_chunk = hidden[rows] if isinstance(rows, slice) else hidden.index_select(0, rows)
        if hidden_chunk.dtype != acc:
            hidden_chunk = hidden_chunk.to(acc)

        # logits [count, V]: one row per token
        logits = logits_storage[: vocab * count].view(count, vocab)
        if bias_acc is None:
            torch.mm(hidden_chunk, weight_acc.T, out=logits)
        else:
            torch.addmm(bias_acc, hidden_chunk, weight_acc.T, out=logits)
        deriv = None
        if softcap is not None:
            logits.mul_(1.0 / softcap).tanh_()
            if deriv_storage is not None:
                # d(c*tanh(y/c))/dy = 1 - tanh(y/c)^2
                deriv = deriv_storage[: vocab * count].view(count, vocab)
                torch.mul(logits, logits, out=deriv).neg_().add_(1.0)
            logits.mul_(softcap)
        target_col = target_chunk.unsqueeze(1)
        target_logit = logits.gather(1, target_col).squeeze(1)
        logit_sum = logits.sum(1) if label_smoothing else None

        # Softmax from log_softmax ((z - max) - log sum), even in a backward that could reuse the forward's lse:
        # exp(z - lse) with lse rounded to fp32 loses p_t - 1 when p_t ~ 1 (a peaked softmax). Each elementwise
        # step runs on the whole chunk: slicing it to stay in L2 measured slower (more parallel regions).
        if want_grads:
            if uniform_scale:
                token_scale, alpha = None, float(grad_scale)
            else:
                token_scale, alpha = grad_scale[tokens], 1.0
                if chunk_valid is not None:
                    token_scale = torch.where(chunk_valid, token_scale, torch.zeros_like(token_scale))
            onehot = onehot_storage[:count]
        torch.log_softmax(logits, 1, out=logits)
        target_log_prob = logits.gather(1, target_col).squeeze(1)
        if want_grads:
            # dloss_n/dz_nj = (p_nj - (1 - eps) [j == t_n] - eps / V) + 2 z_loss lse_n p_nj, times the upstream grad
            logits.exp_()
            # subtract the one-hot before scaling: p_t - 1 is exact when p_t ~ 1, (g p_t) - g is not
            logits.scatter_add_(1, target_col, onehot)
            if label_smoothing:
                logits.sub_(label_smoothing / vocab)
            if z_loss:
                # + c p with c = 2 z lse, as g0 (1 + c) + c ((1 - eps) [j == t] + eps / V) (g0: the line above):
                # no p (1 + c) - 1, which loses c to cancellation when p_t ~ 1 (V = 1: p_t = 1 exactly)
                z_term = (2.0 * z_loss * (target_logit - target_log_prob)).unsqueeze(1)
                logits.mul_(z_term + 1.0)
                logits.scatter_add_(1, target_col, z_term * smoothing_keep)
                if label_smoothing:
                    logits.add_(z_term * (label_smoothing / vocab))
            if token_scale is not None:
                logits.mul_(token_scale.unsqueeze(1))
            if deriv is not None:
                logits.mul_(deriv)
        chunk_lse = target_logit - target_log_prob
        # -log p_t straight from log_softmax: lse - z_t would cancel badly when p_t ~ 1
        chunk_loss = -smoothing_keep * target_log_prob
        if label_smoothing:
            chunk_loss = chunk_loss + label_smoothing * (chunk_lse - logit_sum / vocab)
        if z_loss:
            chunk_loss = chunk_loss + z_loss * chunk_lse.square()
        if chunk_valid is not None:
            chunk_loss = torch.where(chunk_valid, chunk_loss, torch.zeros_like(chunk_loss))
            chunk_lse = torch.where(chunk_valid, chunk_lse, torch.zeros_like(chunk_lse))
        loss[tokens] = chunk_loss
        lse[tokens] = chunk_lse
        if not want_grads:
            continue
        grad = logits

        if grad_hidden is not None:
            if isinstance(rows, slice):
                torch.addmm(grad_hidden[rows], grad, weight_acc, beta=0.0, alpha=alpha, out=grad_hidden[rows])
            else:
                grad_hidden.index_add_(0, rows, grad @ weight_acc, alpha=alpha)
        if grad_weight is not None:
            grad_weight.addmm_(grad.T, hidden_chunk, beta=0.0 if start == 0 else 1.0, alpha=alpha)
        if grad_bias is not None:
            grad_bias.add_(grad.sum(0), alpha=alpha)

    return _finish(loss, lse, grad_hidden, grad_weight, grad_bias, hidden, weight, bias, cast_grads)


def emulate_grad_tile_cast(dz: torch.Tensor, dtype: torch.dtype, headroom: int = GRAD_TILE_HEADROOM):
    """What the Triton kernels do to a logits-gradient tile before a half-precision tensor-core dot
    (``triton_common.grad_tile_for_dot``), in torch with the same bit arithmetic: (dz / s cast to ``dtype``, s),
    s a power of two putting max|dz| in (2^(headroom-1), 2^headroom]; s = 1 for an all-zero tile."""
    amax = dz.detach().abs().max().to(torch.float32).reshape(1)
    bits = amax.view(torch.int32)
    exponent = (bits + 0x7FFFFF) >> 23
    exponent = torch.where(amax > 0, exponent - headroom, torch.full_like(exponent, 127)).clamp(1, 253)
    scale = (exponent << 23).view(torch.float32)
    inverse = ((254 - exponent) << 23).view(torch.float32)
    return (dz * inverse).to(dtype), scale.reshape(())


def _rows_of(tokens, row_index: Optional[torch.Tensor]):
    if row_index is None:
        return tokens
    return row_index[tokens]


def cast_grads_like(grads, inputs):
    """fp32-accumulated gradients back to their inputs' dtypes (None stays None)."""
    return tuple(None if g is None else (g if g.dtype == x.dtype else g.to(x.dtype)) for g, x in zip(grads, inputs))


def _finish(loss, lse, grad_hidden, grad_weight, grad_bias, hidden, weight, bias, cast_grads=True):
    if not cast_grads:
        return loss, lse, grad_hidden, grad_weight, grad_bias
    return (loss, lse) + cast_grads_like((grad_hidden, grad_weight, grad_bias), (hidden, weight, bias))
