"""Triton helpers shared by the linear + cross-entropy forward and backward kernels.

Constexpr conventions of every kernel here:
  UPCAST         loads are upcast to fp32 and dots run in IEEE fp32 (the interpreter: its bf16 arithmetic and
                 bf16 ``tl.dot`` are wrong)
  DOT_PRECISION  ``input_precision`` of the dots on a GPU: "tf32x3" for fp32 inputs (tensor cores, about fp32
                 accuracy), ignored for fp16/bf16 operands
  HALF_GRAD      the logits-gradient tile is cast to the inputs' fp16/bf16 for the tensor cores; it is first
                 scaled by a power of two (``grad_tile_for_dot``) so that small entries stay representable

The power-of-two scaling is written twice on purpose, once here for the kernels and once in torch
(``torch_impl.emulate_grad_tile_cast``), with the same bit arithmetic; a test runs the Triton helper under the
interpreter and checks it equals the torch emulation bit for bit, and another checks the emulation against fp64
at realistic sizes.
"""
from __future__ import annotations

import triton
import triton.language as tl

# The largest entry of a scaled gradient tile lies in (2^(HEADROOM-1), 2^HEADROOM]: far from fp16's 65504, far
# above its smallest normal 2^-14 (so entries 2^28 times smaller than the tile's largest are still normal).
from .torch_impl import GRAD_TILE_HEADROOM  # noqa: F401  (one constant for the kernels and the emulation)


@triton.jit
def _tanh(x):
    # from exp rather than libdevice (not available under the interpreter); saturates cleanly for large |x|
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Logits of a [BLOCK_N, BLOCK_V] tile in fp32, softcapped."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(h_ptr + rows[:, None] * stride_h + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v.to(tl.int64)[:, None] * stride_w + offs_d[None, :],
                    mask=v_mask[:, None] & d_mask[None, :], other=0.0)
        acc = _dot(x, tl.trans(w), acc, UPCAST, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _grad_logits(z, row_max, log_sum, target, offs_v, v_mask, row_mask, z_term, smoothing, softcap, V,
                 HAS_SOFTCAP: tl.constexpr):
    """d loss_n / d y for a tile, before the upstream gradient g: (p - (1 - eps) [j == t] - eps / V)
    + 2 z_loss lse p (z_term = 2 z_loss lse, added last: no cancellation of it when p_t ~ 1), times the softcap derivative 1 - tanh^2 = 1 - (z / softcap)^2 (from the capped z: no second tile
    of registers). p = exp((z - max) - log_sum): the lse rounded to fp32
    would lose p_t - 1 when p_t ~ 1; the one-hot is subtracted before any scaling for the same reason."""
    probs = tl.exp((z - row_max[:, None]) - log_sum[:, None])
    is_target = offs_v[None, :] == target[:, None]
    dz = (probs - tl.where(is_target, 1.0 - smoothing, 0.0) - smoothing / V) + probs * z_term[:, None]
    if HAS_SOFTCAP:
        capped = z / softcap
        dz = dz * (1.0 - capped * capped)
    return tl.where(row_mask[:, None] & v_mask[None, :], dz, 0.0)


@triton.jit
def _dz_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, target, row_max, log_sum, z_term, D, stride_h,
             stride_w, smoothing, softcap, V, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
             UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """The logits-gradient tile (before the upstream gradient), from recomputed logits."""
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w, softcap, HAS_BIAS,
                     HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    return _grad_logits(z, row_max, log_sum, target, offs_v, v_mask, row_mask, z_term, smoothing, softcap, V,
                        HAS_SOFTCAP)


@triton.jit
def grad_tile_for_dot(dz, dtype: tl.constexpr, HEADROOM: tl.constexpr):
    """(dz / s cast to ``dtype``, s) with s a power of two putting max|dz| in (2^(HEADROOM-1), 2^HEADROOM]; the
    dot of the cast tile times s is the dot of dz (s is exact: no rounding is added by the scaling). s = 1 for
    an all-zero tile. Bit arithmetic (no log2/exp2 approximations): the exponent of max|dz| rounded up to a
    power of two, minus HEADROOM."""
    amax = tl.max(tl.max(tl.abs(dz), axis=1), axis=0)
    bits = amax.to(tl.int32, bitcast=True)
    exponent = (bits + 0x7FFFFF) >> 23                      # biased exponent of 2^ceil(log2 amax)
    exponent = tl.where(amax > 0.0, exponent - HEADROOM, 127)
    exponent = tl.minimum(tl.maximum(exponent, 1), 253)
    scale = (exponent << 23).to(tl.float32, bitcast=True)
    inverse = ((254 - exponent) << 23).to(tl.float32, bitcast=True)
    return (dz * inverse).to(dtype), scale


@triton.jit
def _grouped_tile(pid, n_rows_blocks, n_cols_blocks, GROUP: tl.constexpr):
    """(row block, column block) of program ``pid`` in grouped order: GROUP consecutive row blocks walk the
    column blocks together, so the column operand they share is read from L2 rather than memory."""
    per_group = GROUP * n_cols_blocks
    first_row = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_rows_blocks - first_row, GROUP)
    local = pid % per_group
    return first_row + local % group_rows, local // group_rows


@triton.jit
def _load_grad_terms(offs_n, row_mask, slot_token_ptr, slot_row_ptr, slot_target_ptr, grad_scale_ptr,
                     grad_scale_stride, max_ptr, log_sum_ptr, z_loss):
    rows = tl.load(slot_row_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    target = tl.load(slot_target_ptr + offs_n, mask=row_mask, other=0)
    token = tl.load(slot_token_ptr + offs_n, mask=row_mask, other=0)
    g = tl.load(grad_scale_ptr + token * grad_scale_stride, mask=row_mask, other=0.0).to(tl.float32)
    row_max = tl.load(max_ptr + token, mask=row_mask, other=0.0)
    log_sum = tl.load(log_sum_ptr + token, mask=row_mask, other=0.0)
    z_term = 2.0 * z_loss * (row_max + log_sum)
    return rows, target, row_max, log_sum, g, z_term


@triton.jit
def _token_block_dz(h_ptr, w_ptr, b_ptr, offs_n, row_mask, offs_v, v_mask, slot_token_ptr, slot_row_ptr,
                    slot_target_ptr, grad_scale_ptr, grad_scale_stride, max_ptr, log_sum_ptr, z_loss, D, stride_h,
                    stride_w, smoothing, softcap, V, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """A block of token slots against a vocabulary tile: (hidden rows, upstream gradient g, dz tile)."""
    rows, target, row_max, log_sum, g, z_term = _load_grad_terms(
        offs_n, row_mask, slot_token_ptr, slot_row_ptr, slot_target_ptr, grad_scale_ptr, grad_scale_stride,
        max_ptr, log_sum_ptr, z_loss)
    dz = _dz_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, target, row_max, log_sum, z_term, D,
                  stride_h, stride_w, smoothing, softcap, V, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N,
                  BLOCK_V, BLOCK_D)
    return rows, g, dz


@triton.jit
def _scaled_grad(dz, g, dtype: tl.constexpr, HALF_GRAD: tl.constexpr, HEADROOM: tl.constexpr):
    """The tile g * dz as a dot operand, and the factor to multiply the dot by (1, or the power of two)."""
    dz = dz * g[:, None]
    scale = 1.0
    if HALF_GRAD:
        dz, scale = grad_tile_for_dot(dz, dtype, HEADROOM)
    return dz, scale


@triton.jit
def _skip_tile(dz, filter_eps, FILTER: tl.constexpr):
    """Gradient filtering: True when every |dz| of the tile (before the upstream gradient) is below filter_eps."""
    skip = False
    if FILTER:
        skip = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) < filter_eps
    return skip
