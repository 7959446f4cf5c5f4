"""Chunked linear + cross-entropy in plain PyTorch: the path CPU users get.

Tokens are processed in chunks of ``chunk_rows``; only one chunk of fp32 logits exists at a time (see
``default_chunk_rows``: up to 512 rows, where the matmuls run at about their full-size speed, with the buffer at
most eight hidden gradients, and at least 128 rows). For each chunk, one pass computes the loss and — when
gradients are wanted — the gradient of the logits in the same buffer, which two more matmuls turn into dHidden
and dWeight (3 matmuls per chunk; the weight gradient accumulates in one fp32 [V, D] buffer via ``addmm_``,
written by the first chunk).

Speed: the three matmuls of a forward + backward are the floor (``bench/linear_ce_cpu_floor.py`` times the op
against them; figures in docs/linear_ce_cpu.md). The chunk's logits are token-major ([chunk, V]), so the
softmax reduces along contiguous rows; on CPU with gradients it is one in-place ``softmax`` (one pass over the
buffer, one exp per entry), log p_t coming from p_t; the one-hot term is a scatter into the buffer; the uniform
gradient scale (1/n for "mean") rides on the matmuls' ``alpha`` and a per-token scale on the [chunk, D]
operands, instead of a pass over the buffer. What is left above the floor is per chunk: each matmul re-packs
W and the dW update re-reads and re-writes [V, D], for chunk-many rows of work.

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

# Rows per chunk. Each chunk's matmuls re-pack W and re-write dW for chunk-many rows of work: per row, the
# overhead goes as 1/rows at any V. Measured (docs/linear_ce_cpu.md, N=4096, D=512, V=32000): per matmul against
# its full-size twin on 1 thread, 64 rows 1.1-1.7x, 128 rows 1.0-1.1x, 192-256 rows 1.0x; the whole op on 2
# threads, 256 rows 1.19-1.22x the three matmuls, 384 rows 1.12-1.17x, 512 rows 1.09-1.15x. So FULL_SPEED_ROWS,
# with the fp32 logits buffer capped at BUFFER_PER_HIDDEN_GRAD times the hidden gradient [N, D] (at the target
# shape 512 rows: peak 0.89x torch 2.13's chunked F.linear_cross_entropy, whose backward copies the gradients its
# forward computed; the KARMA train step's ~2k tokens at V=128k keep 128 rows) — unless that is under
# EFFICIENT_ROWS: then EFFICIENT_ROWS (at most D/4 rows: 1/4 of the weight gradient's size; 64-row chunks made
# the train step at V=128k 1.7x slower than 128-row ones, bench/bench_train_step.py).
FULL_SPEED_ROWS = 512
BUFFER_PER_HIDDEN_GRAD = 8
EFFICIENT_ROWS = 128
# Half-precision gradient tiles of the Triton kernels are scaled so that their largest entry lies in
# (2^(HEADROOM-1), 2^HEADROOM] before the cast (see ``emulate_grad_tile_cast``).
GRAD_TILE_HEADROOM = 14
# Chunks are a multiple of this many rows (matmul kernels block rows by 8/16).
CHUNK_ROW_MULTIPLE = 16
# Below this a target probability from the softmax has lost precision (fp32 normals end at 2^-126): its log is
# taken from recomputed logits instead.
TINY_PROB = 2.0 ** -100


def default_chunk_rows(n_tokens: int, vocab: int, dim: int) -> int:
    rows = min(FULL_SPEED_ROWS, BUFFER_PER_HIDDEN_GRAD * n_tokens * dim // max(vocab, 1))
    if rows < EFFICIENT_ROWS:
        rows = min(EFFICIENT_ROWS, dim // 4)
    rows = rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return max(1, min(max(rows, CHUNK_ROW_MULTIPLE), n_tokens))


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
        deriv = None if deriv_storage is None else deriv_storage[: vocab * count].view(count, vocab)
        _logits(hidden_chunk, weight_acc, bias_acc, softcap, logits, deriv)
        target_col = target_chunk.unsqueeze(1)
        target_logit = logits.gather(1, target_col).squeeze(1)
        logit_sum = logits.sum(1) if label_smoothing else None

        # The softmax, never exp(z - lse) with a rounded lse (it loses p_t - 1 when p_t ~ 1, a peaked softmax).
        # With gradients on CPU: one in-place softmax (ATen's runs row by row in cache: max, exp + sum, scale;
        # one pass over the buffer and one exp per entry), log p_t from p_t. Otherwise log_softmax, then exp.
        # Each elementwise step runs on the whole chunk: slicing it to stay in L2 measured slower.
        if want_grads:
            if uniform_scale:
                token_scale, alpha = None, float(grad_scale)
            else:
                token_scale, alpha = grad_scale[tokens], 1.0
                if chunk_valid is not None:
                    token_scale = torch.where(chunk_valid, token_scale, torch.zeros_like(token_scale))
            onehot = onehot_storage[:count]
        if want_grads and device.type == "cpu":
            torch.softmax(logits, 1, out=logits)
            target_log_prob = _log_target_prob(logits, target_col, target_logit, hidden_chunk, weight_acc,
                                               bias_acc, softcap)
        else:
            torch.log_softmax(logits, 1, out=logits)
            target_log_prob = logits.gather(1, target_col).squeeze(1)
            if want_grads:
                logits.exp_()
        if want_grads:
            # dloss_n/dz_nj = (p_nj - (1 - eps) [j == t_n] - eps / V) + 2 z_loss lse_n p_nj, times the upstream grad
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
        grad = logits  # before the per-token scale, which rides on the [count, D] operands instead of a pass
        row_scale = None if token_scale is None else token_scale.unsqueeze(1)

        if grad_hidden is not None:
            if isinstance(rows, slice) and row_scale is None:
                torch.addmm(grad_hidden[rows], grad, weight_acc, beta=0.0, alpha=alpha, out=grad_hidden[rows])
            elif isinstance(rows, slice):
                torch.mm(grad, weight_acc, out=grad_hidden[rows]).mul_(row_scale)
            else:
                product = grad @ weight_acc
                grad_hidden.index_add_(0, rows, product if row_scale is None else product.mul_(row_scale),
                                       alpha=alpha)
        if grad_weight is not None:
            scaled_hidden = hidden_chunk if row_scale is None else hidden_chunk * row_scale
            grad_weight.addmm_(grad.T, scaled_hidden, beta=0.0 if start == 0 else 1.0, alpha=alpha)
        if grad_bias is not None:
            grad_bias.add_(grad.sum(0) if token_scale is None else token_scale @ grad, alpha=alpha)

    return _finish(loss, lse, grad_hidden, grad_weight, grad_bias, hidden, weight, bias, cast_grads)


def _logits(hidden_rows, weight, bias, softcap, out, deriv=None) -> None:
    """out [rows, V] = the (soft-capped) logits; ``deriv`` (optional) = the softcap's derivative."""
    if bias is None:
        torch.mm(hidden_rows, weight.T, out=out)
    else:
        torch.addmm(bias, hidden_rows, weight.T, out=out)
    if softcap is not None:
        out.mul_(1.0 / softcap).tanh_()
        if deriv is not None:
            # d(c*tanh(y/c))/dy = 1 - tanh(y/c)^2
            torch.mul(out, out, out=deriv).neg_().add_(1.0)
        out.mul_(softcap)


def _log_target_prob(probs, target_col, target_logit, hidden_rows, weight, bias, softcap) -> torch.Tensor:
    """log p_t [rows] from the softmax ``probs``; rows whose p_t is below TINY_PROB (lost precision, or 0)
    take z_t - logsumexp(z) from their logits recomputed (rare: a loss above ~69 nats)."""
    target_prob = probs.gather(1, target_col).squeeze(1)
    log_prob = target_prob.log()
    tiny = (target_prob < TINY_PROB).nonzero().squeeze(1)  # a host sync: CPU only
    if tiny.numel():
        logits = torch.empty((tiny.numel(), probs.shape[1]), dtype=probs.dtype, device=probs.device)
        _logits(hidden_rows.index_select(0, tiny), weight, bias, softcap, logits)
        log_prob[tiny] = target_logit[tiny] - torch.logsumexp(logits, 1)
    return log_prob


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
