"""Tile-level Triton helpers shared by the contrastive forward and backward kernels.

Conventions: a tile is [rows, keys]; logits and every elementwise value are float32. ``DOT`` (constexpr) picks how a
``tl.dot`` runs: "native" (float16 / bfloat16 operands on tensor cores, float32 accumulation), "split_f16" (float32
inputs on GPU with D <= 256: q and k arrive pre-split by the launcher into float16 (hi, lo) parts, see
``triton_impl.split_f16``; a dot is three float16 tensor-core products hi·lo + lo·hi + hi·hi, float32-class
accuracy; a float32 register operand (the gradient tile) is split in registers), "tf32x3" (float32 inputs beyond
that D: three TF32 products) or "ieee" (float32 FMA; what the interpreter runs for the other modes, because its
bfloat16 dot is wrong). ``GRAD_DOT`` "split_f16_t" is "split_f16" with the gradient accumulators held transposed
(``_mma_grad``).

In "split_f16" mode an operand tile is a tuple (hi, lo) of float16 tiles read from a parts tensor [rows, 2·P]
(hi in columns [0, D), lo from column P = stride / 2, D rounded up to 8); ``_load_value`` gives hi + lo in
float32 where a value is needed.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _split_f16(x):
    """(hi, lo) float16 parts of a float32 tile whose entries lie within float16's range: hi + lo = x to ~2**-22."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _dot_parts(a, b, acc):
    """acc + a @ b for (hi, lo) parts: the small products first, lo·lo (~2**-22 of the result) left out."""
    acc = tl.dot(a[1], b[0], acc)
    acc = tl.dot(a[0], b[1], acc)
    return tl.dot(a[0], b[0], acc)


@triton.jit
def _grad_operand(g, DOT: tl.constexpr):
    """A float32 register tile (the gradient tile) as the left operand of ``_mma``: split once into (hi, lo) in
    "split_f16" modes (every dot of the tile reads the same parts), else as is (``_mma`` casts it)."""
    if DOT == "split_f16" or DOT == "split_f16_t":
        return _split_f16(g)
    else:
        return g


@triton.jit
def _transposed(a, DOT: tl.constexpr):
    """tl.trans of an operand (of each part in the "split_f16" modes)."""
    if DOT == "split_f16" or DOT == "split_f16_t":
        return tl.trans(a[0]), tl.trans(a[1])
    else:
        return tl.trans(a)


@triton.jit
def _grad_acc(ROWS: tl.constexpr, COLS: tl.constexpr, DOT: tl.constexpr):
    """A zero accumulator of a (ROWS x COLS) gradient product (``_mma_grad``): held transposed in "split_f16_t"
    mode."""
    if DOT == "split_f16_t":
        return tl.zeros((COLS, ROWS), dtype=tl.float32)
    else:
        return tl.zeros((ROWS, COLS), dtype=tl.float32)


@triton.jit
def _mma_grad(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b for a register tile ``a`` (``_grad_operand``). In "split_f16_t" mode (float32 with D > 64) acc
    is held transposed and updated as acc + b^T a^T: the parts of ``a`` then reach the dots through shared memory
    and every product of the chain keeps one accumulator layout (with ``a`` as the register operand Triton gives
    the three products two layouts and converts the float32 accumulator twice per tile)."""
    if DOT == "split_f16_t":
        return _dot_parts(_transposed(b, DOT), _transposed(a, DOT), acc)
    else:
        return _mma(a, b, acc, DOT)


@triton.jit
def _grad_result(acc, DOT: tl.constexpr):
    """The (ROWS x COLS) value of a ``_grad_acc`` accumulator."""
    if DOT == "split_f16_t":
        return tl.trans(acc)
    else:
        return acc


@triton.jit
def _mma(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b with the precision ``DOT`` names; a float32 ``a`` is cast to ``b``'s dtype first; in
    "split_f16" mode both are (hi, lo) tuples (``_load_operand``, ``_grad_operand``)."""
    if DOT == "native":
        return tl.dot(a.to(b.dtype), b, acc)
    elif DOT == "split_f16" or DOT == "split_f16_t":
        return _dot_parts(a, b, acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT)


@triton.jit
def _query_block(row_start, B, target_ptr, key_ids_ptr, HAS_KEY_IDS: tl.constexpr, BLOCK_B: tl.constexpr):
    """A block of query rows: (rows, row_ok, target, positive_id), the id that marks false negatives."""
    rows = row_start + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    target = tl.load(target_ptr + rows, mask=row_ok, other=0)
    positive_id = target
    if HAS_KEY_IDS:
        positive_id = tl.load(key_ids_ptr + target, mask=row_ok, other=0)
    return rows, row_ok, target, positive_id


@triton.jit
def _row_grad_inputs(coef_ptr, stats_ptr, rows, row_ok, B, PAIRWISE: tl.constexpr):
    """Per-row (scaled) upstream coefficient and the statistics of a block of rows (the launcher's kernel_stats):
    pairwise (target logit, 1 / count, mean sigmoid), softmax (shift m, coef * exp(-l), target logit)."""
    row_coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    row_stat0 = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    if PAIRWISE:
        row_stat1 = tl.load(stats_ptr + B + rows, mask=row_ok, other=0.0)
    else:
        row_stat1 = tl.load(stats_ptr + 3 * B + rows, mask=row_ok, other=0.0)
    row_stat2 = tl.load(stats_ptr + 2 * B + rows, mask=row_ok, other=0.0)
    return row_coef, row_stat0, row_stat1, row_stat2


@triton.jit
def _load_rows(ptr, rows, row_ok, stride, dims, D, EVEN_D: tl.constexpr):
    """ptr[rows, dims] (zero outside); no D mask when D equals the tile width (keeps 16-byte vector loads)."""
    offsets = rows.to(tl.int64)[:, None] * stride + dims[None, :]
    if EVEN_D:
        return tl.load(ptr + offsets, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(ptr + offsets, mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def _lo_offset(stride, D, EVEN_D: tl.constexpr):
    """Column of the lo parts in a [rows, 2·P] parts tensor: P = stride / 2, which is D with EVEN_D (D a power of
    two >= 32; in the audit D costs fewer registers than stride // 2)."""
    if EVEN_D:
        return D
    else:
        return stride // 2


@triton.jit
def _load_operand(ptr, rows, row_ok, stride, dims, D, EVEN_D: tl.constexpr, DOT: tl.constexpr):
    """A dot operand tile ptr[rows, dims]: a (hi, lo) tuple of float16 parts in "split_f16" mode."""
    if DOT == "split_f16":
        return _load_rows(ptr, rows, row_ok, stride, dims, D, EVEN_D), \
            _load_rows(ptr + _lo_offset(stride, D, EVEN_D), rows, row_ok, stride, dims, D, EVEN_D)
    else:
        return _load_rows(ptr, rows, row_ok, stride, dims, D, EVEN_D)


@triton.jit
def _load_value(ptr, rows, row_ok, stride, dims, D, EVEN_D: tl.constexpr, DOT: tl.constexpr):
    """ptr[rows, dims] as float32 values (hi + lo of the parts in "split_f16" mode)."""
    if DOT == "split_f16":
        return _load_rows(ptr, rows, row_ok, stride, dims, D, EVEN_D).to(tl.float32) + \
            _load_rows(ptr + _lo_offset(stride, D, EVEN_D), rows, row_ok, stride, dims, D, EVEN_D).to(tl.float32)
    else:
        return _load_rows(ptr, rows, row_ok, stride, dims, D, EVEN_D).to(tl.float32)


@triton.jit
def _resident_halves(ptr, rows, row_ok, stride, dims0, dims1, D, EVEN_D: tl.constexpr, RESIDENT: tl.constexpr,
                     DOT: tl.constexpr):
    """The two D halves of a block of rows when it stays resident (else placeholders: the dots read D chunks)."""
    if RESIDENT:
        return _load_operand(ptr, rows, row_ok, stride, dims0, D, EVEN_D, DOT), \
            _load_operand(ptr, rows, row_ok, stride, dims1, D, EVEN_D, DOT)
    else:
        return 0.0, 0.0


@triton.jit
def _store_rows(ptr, rows, row_ok, stride, dims, D, value):
    """ptr[rows, dims] = value, in ptr's dtype (int64 offsets: rows * stride may pass 2**31)."""
    offsets = rows.to(tl.int64)[:, None] * stride + dims[None, :]
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (dims < D)[None, :])


@triton.jit
def _resident_dots(q0, q1, k0, k1, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, DOT: tl.constexpr):
    """q . k of resident tiles held as two D halves: every kernel forms its logits in this one order, so the
    backward's tiles are bitwise the forward's (a row whose only valid key is its positive gets G = 0 exactly)."""
    acc = _mma(q0, _transposed(k0, DOT), tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32), DOT)
    return _mma(q1, _transposed(k1, DOT), acc, DOT)


@triton.jit
def _chunked_dots(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_q, stride_k, BLOCK_B: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """q[rows] . k[cols] over D in BLOCK_D chunks (D larger than one resident tile), float32 [BLOCK_B, BLOCK_M]."""
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        q_tile = _load_rows(q_ptr, rows, row_ok, stride_q, dims, D, False)
        k_tile = _load_rows(k_ptr, cols, col_ok, stride_k, dims, D, False)
        acc = _mma(q_tile, tl.trans(k_tile), acc, DOT)
    return acc


@triton.jit
def _shift_logits(dots, inv_t, logq_ptr, cols, col_ok, HAS_LOGQ: tl.constexpr):
    """s = dots / T - logq[cols]."""
    s = dots * inv_t
    if HAS_LOGQ:
        s -= tl.load(logq_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return s


@triton.jit
def _valid_tile(rows, cols, row_ok, col_ok, target, positive_id, key_ids_ptr, HAS_KEY_IDS: tl.constexpr):
    """(valid, is_target) masks of a tile: key j is valid for row i unless it is a false negative."""
    valid = row_ok[:, None] & col_ok[None, :]
    is_target = (cols[None, :] == target[:, None]) & valid   # padding rows (target 0) have no positive
    if HAS_KEY_IDS:
        key_id = tl.load(key_ids_ptr + cols, mask=col_ok, other=0)
        valid = valid & ((key_id[None, :] != positive_id[:, None]) | is_target)
    return valid, is_target


@triton.jit
def _softplus_sigmoid(x):
    """Stable softplus(x) and sigmoid(x) from one exp and one reciprocal."""
    e = tl.exp(-tl.abs(x))
    # log1p(e) without libdevice: the series is exact to float32 for small e
    log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    softplus = tl.maximum(x, 0.0) + log1p_e
    r = 1.0 / (1.0 + e)
    sigmoid = tl.where(x >= 0, r, e * r)
    return softplus, sigmoid


@triton.jit
def _grad_tile(s, rows, cols, valid, is_target, row_coef, row_stat0, row_stat1, row_stat2, col_shift, col_scale,
               PAIRWISE: tl.constexpr, SYMMETRIC: tl.constexpr):
    """G * S = S * d(sum_i coef_i loss_i) / d s for one tile (formulas in torch_impl). The coefficients arrive
    multiplied by the launcher's power of two S (``grad_scale``), so that G * S is cast to half precision without
    flushing; the kernels divide S out of their float32 accumulators."""
    if PAIRWISE:
        # stats: target logit, 1/count, mean sigmoid
        _, sigmoid = _softplus_sigmoid(s - row_stat0[:, None])
        negative = valid & (~is_target)
        g = tl.where(negative, sigmoid, 0.0) * (row_coef * row_stat1)[:, None]
        g -= tl.where(is_target, (row_coef * row_stat2)[:, None], 0.0)
    else:
        # stats (the launcher's kernel_stats): shift m and coef * exp(-l): coef * P = exp(s - m) * (coef * exp(-l)),
        # the lse m + l never rounded into one float32. exp of masked entries is never formed (a false negative may
        # sit far above the row's lse)
        g = tl.exp(tl.where(valid, s - row_stat0[:, None], float("-inf"))) * row_stat1[:, None]
        if SYMMETRIC:   # target = arange: the positive of row i is key i, and of column i query i (same coef)
            g += tl.exp(tl.where(valid, s - col_shift[None, :], float("-inf"))) * col_scale[None, :]
            g -= tl.where(is_target, 2.0 * row_coef[:, None], 0.0)
        else:
            g -= tl.where(is_target, row_coef[:, None], 0.0)
    return g


@triton.jit
def _logit_tile(q0, q1, k0, k1, q_ptr, k_ptr, logq_ptr, key_ids_ptr, rows, cols, row_ok, col_ok, target,
                positive_id, inv_t, D, stride_q, stride_k, HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr,
                RESIDENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT: tl.constexpr):
    """(s, valid, is_target) of one tile: from the resident halves (q0, q1, k0, k1) or, beyond MAX_RESIDENT_D,
    from D chunks read at q_ptr / k_ptr."""
    if RESIDENT:
        dots = _resident_dots(q0, q1, k0, k1, BLOCK_B, BLOCK_M, DOT)
    else:
        dots = _chunked_dots(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_q, stride_k, BLOCK_B, BLOCK_M,
                             BLOCK_D, DOT)
    s = _shift_logits(dots, inv_t, logq_ptr, cols, col_ok, HAS_LOGQ)
    valid, is_target = _valid_tile(rows, cols, row_ok, col_ok, target, positive_id, key_ids_ptr, HAS_KEY_IDS)
    return s, valid, is_target
