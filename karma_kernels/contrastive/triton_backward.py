"""Backward Triton kernels of ``contrastive_loss``: logit tiles are recomputed from the saved per-row statistics.

Two schedules (the launcher picks one, like PyTorch: deterministic when
``torch.are_deterministic_algorithms_enabled()``):

* atomic (default, FlashAttention-2 style): ``_grad_keys_kernel`` with ``ATOMIC_DQ``, one program per block of keys
  with the key block resident; for each block of query rows it forms the logit tile (1 dot), the gradient tile G,
  dK += G^T Q in registers (1 dot) and adds G K (1 dot) into a float32 dQ buffer with atomics: 3F in all.
* deterministic: ``_grad_query_kernel`` (programs own query rows: 2 dots per tile) + ``_grad_keys_kernel`` (programs
  own keys: 2 dots per tile), no atomics: 4F.

For D <= BLOCK_D (``RESIDENT``: every default config up to D = 256, every dtype) the program's own block is loaded
once and the loop's tiles are software-pipelined. Larger D splits the output's D over a second grid axis of
BLOCK_DV slices, each recomputing the logits in BLOCK_D chunks: with S slices the atomic schedule does (S + 2)F,
the deterministic one 2(S + 1)F. float32 inputs take the deterministic schedule.

G reaches ``tl.dot`` in the input's half precision: the upstream coefficients arrive multiplied by a power of two
S (see ``triton_impl.grad_scale``) so that small entries of G do not flush to zero; ``unscale`` = 1/S is applied
to the float32 accumulators. float32 inputs ("split_f16", see triton_tiles): q and k arrive as float16 (hi, lo)
parts, G is split once per tile into (hi, lo) and the gradient accumulators are held transposed (acc^T += K^T G^T,
``_mma_grad``), which keeps every product of a chain in one accumulator layout.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_tiles import (_grad_acc, _grad_operand, _grad_result, _grad_tile, _load_operand, _load_value,
                           _logit_tile, _mma_grad, _query_block, _row_grad_inputs, _store_rows, _transposed)


@triton.jit
def _column_inputs(stats_ptr, cols, col_ok, B, BLOCK_M: tl.constexpr, SYMMETRIC: tl.constexpr):
    """(col_shift, col_scale): in the symmetric mode (M == B) column j's shift m_j and coef_j * exp(-l_j), the
    column statistics of the launcher's kernel_stats (rows 1 and 4)."""
    if SYMMETRIC:
        col_shift = tl.load(stats_ptr + B + cols, mask=col_ok, other=0.0)
        col_scale = tl.load(stats_ptr + 4 * B + cols, mask=col_ok, other=0.0)
    else:
        col_shift = tl.zeros((BLOCK_M,), dtype=tl.float32)
        col_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return col_shift, col_scale


@triton.jit
def _output_stride(operand_stride, D, DOT: tl.constexpr, EVEN_D: tl.constexpr):
    """Row stride of dQ / dK (contiguous, like their inputs): D in "split_f16" mode, whose operands are
    [rows, 2·P] float16 parts (written as half the parts' stride when that is D: 0-24 fewer registers in the
    audit than D itself)."""
    if DOT == "split_f16":
        if EVEN_D:
            return operand_stride // 2
        else:
            return D
    else:
        return operand_stride


@triton.jit
def _grad_query_kernel(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, temperature_ptr, stats_ptr, coef_ptr,
                       unscale_ptr, dq_ptr, dot_partial_ptr, B, M, D, stride_q, stride_k,
                       HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr, PAIRWISE: tl.constexpr,
                       SYMMETRIC: tl.constexpr, RESIDENT: tl.constexpr, EVEN_D: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       DOT: tl.constexpr, GRAD_DOT: tl.constexpr):
    """dQ of a block of rows over the program's D slice (held as two halves, like every kernel here)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_DV // 2
    rows, row_ok, target, positive_id = _query_block(pid * BLOCK_B, B, target_ptr, key_ids_ptr, HAS_KEY_IDS,
                                                     BLOCK_B)
    dims0 = pid_d * BLOCK_DV + tl.arange(0, HALF)
    dims1 = dims0 + HALF
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    row_coef, row_stat0, row_stat1, row_stat2 = _row_grad_inputs(coef_ptr, stats_ptr, rows, row_ok, B, PAIRWISE)
    q0 = _load_operand(q_ptr, rows, row_ok, stride_q, dims0, D, EVEN_D, DOT)
    q1 = _load_operand(q_ptr, rows, row_ok, stride_q, dims1, D, EVEN_D, DOT)

    acc0 = _grad_acc(BLOCK_B, HALF, GRAD_DOT)
    acc1 = _grad_acc(BLOCK_B, HALF, GRAD_DOT)
    for n0 in range(0, M, BLOCK_M):
        cols = n0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        k0 = _load_operand(k_ptr, cols, col_ok, stride_k, dims0, D, EVEN_D, DOT)
        k1 = _load_operand(k_ptr, cols, col_ok, stride_k, dims1, D, EVEN_D, DOT)
        s, valid, is_target = _logit_tile(q0, q1, k0, k1, q_ptr, k_ptr, logq_ptr, key_ids_ptr, rows, cols, row_ok,
                                          col_ok, target, positive_id, inv_t, D, stride_q, stride_k, HAS_KEY_IDS,
                                          HAS_LOGQ, RESIDENT, BLOCK_B, BLOCK_M, BLOCK_D, DOT)
        col_shift, col_scale = _column_inputs(stats_ptr, cols, col_ok, B, BLOCK_M, SYMMETRIC)
        g = _grad_tile(s, rows, cols, valid, is_target, row_coef, row_stat0, row_stat1, row_stat2, col_shift,
                       col_scale, PAIRWISE, SYMMETRIC)
        g_operand = _grad_operand(g, GRAD_DOT)
        acc0 = _mma_grad(g_operand, k0, acc0, GRAD_DOT)
        acc1 = _mma_grad(g_operand, k1, acc1, GRAD_DOT)
    out_scale = inv_t * tl.load(unscale_ptr)
    dq0 = _grad_result(acc0, GRAD_DOT) * out_scale
    dq1 = _grad_result(acc1, GRAD_DOT) * out_scale
    out_stride = _output_stride(stride_q, D, DOT, EVEN_D)
    _store_rows(dq_ptr, rows, row_ok, out_stride, dims0, D, dq0)
    _store_rows(dq_ptr, rows, row_ok, out_stride, dims1, D, dq1)
    # q_i . dq_i over this D slice, in float32 before rounding dq: the temperature gradient's pieces. Q is read
    # again (after the stores, so the load stays here): keeping the resident tile's registers alive across the
    # key loop for this costs a whole Q block of registers
    q0 = _load_value(q_ptr, rows, row_ok, stride_q, dims0, D, EVEN_D, DOT)
    q1 = _load_value(q_ptr, rows, row_ok, stride_q, dims1, D, EVEN_D, DOT)
    q_dot_dq = tl.sum(q0 * dq0, axis=1) + tl.sum(q1 * dq1, axis=1)
    tl.store(dot_partial_ptr + pid_d * B + rows, q_dot_dq, mask=row_ok)


@triton.jit
def _grad_keys_kernel(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, temperature_ptr, stats_ptr, coef_ptr,
                      unscale_ptr, dk_ptr, dlogq_ptr, dq_acc_ptr, B, M, D, stride_q, stride_k,
                      HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr, LOGQ_GRAD: tl.constexpr,
                      PAIRWISE: tl.constexpr, SYMMETRIC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                      RESIDENT: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT: tl.constexpr,
                      GRAD_DOT: tl.constexpr):
    """dK (and with ATOMIC_DQ: G K added into the float32 [B, slices * BLOCK_DV] buffer dq_acc, unscaled);
    with LOGQ_GRAD the column sums of G * S in dlogq (stored, or added per tile with ATOMIC_DQ: a loop-carried sum
    costs the registers the dQ piece needs; the launcher negates and unscales them).

    The program's D slice is held as two halves (key tile, dK accumulator, query tile, dQ piece): the same dots
    with fewer live registers at a time, which keeps the D = 256 tiles free of spills."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_DV // 2
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    dims0 = pid_d * BLOCK_DV + tl.arange(0, HALF)
    dims1 = dims0 + HALF
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    col_shift, col_scale = _column_inputs(stats_ptr, cols, col_ok, B, BLOCK_M, SYMMETRIC)
    k0 = _load_operand(k_ptr, cols, col_ok, stride_k, dims0, D, EVEN_D, DOT)
    k1 = _load_operand(k_ptr, cols, col_ok, stride_k, dims1, D, EVEN_D, DOT)

    acc0 = _grad_acc(BLOCK_M, HALF, GRAD_DOT)
    acc1 = _grad_acc(BLOCK_M, HALF, GRAD_DOT)
    column_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows, row_ok, target, positive_id = _query_block(r0, B, target_ptr, key_ids_ptr, HAS_KEY_IDS, BLOCK_B)
        row_coef, row_stat0, row_stat1, row_stat2 = _row_grad_inputs(coef_ptr, stats_ptr, rows, row_ok, B, PAIRWISE)
        q0 = _load_operand(q_ptr, rows, row_ok, stride_q, dims0, D, EVEN_D, DOT)
        q1 = _load_operand(q_ptr, rows, row_ok, stride_q, dims1, D, EVEN_D, DOT)
        s, valid, is_target = _logit_tile(q0, q1, k0, k1, q_ptr, k_ptr, logq_ptr, key_ids_ptr, rows, cols, row_ok,
                                          col_ok, target, positive_id, inv_t, D, stride_q, stride_k, HAS_KEY_IDS,
                                          HAS_LOGQ, RESIDENT, BLOCK_B, BLOCK_M, BLOCK_D, DOT)
        g = _grad_tile(s, rows, cols, valid, is_target, row_coef, row_stat0, row_stat1, row_stat2, col_shift,
                       col_scale, PAIRWISE, SYMMETRIC)
        if LOGQ_GRAD:   # before the dots: the float32 tile then dies at its cast to the dots' operand dtype
            if ATOMIC_DQ:   # no loop-carried column sum: the registers the dQ piece needs
                tl.atomic_add(dlogq_ptr + cols, tl.sum(g, axis=0), mask=col_ok & (pid_d == 0), sem="relaxed")
            else:
                column_sum += tl.sum(g, axis=0)
        g_operand = _grad_operand(g, GRAD_DOT)
        acc0 = _mma_grad(_transposed(g_operand, GRAD_DOT), q0, acc0, GRAD_DOT)
        acc1 = _mma_grad(_transposed(g_operand, GRAD_DOT), q1, acc1, GRAD_DOT)
        if ATOMIC_DQ:
            if RESIDENT:    # one slice: a constant row stride (a runtime one costs the symmetric tile a spill)
                row_offsets = rows.to(tl.int64)[:, None] * BLOCK_DV
            else:
                row_offsets = rows.to(tl.int64)[:, None] * (tl.num_programs(1) * BLOCK_DV)
            part = _grad_result(_mma_grad(g_operand, k0, _grad_acc(BLOCK_B, HALF, GRAD_DOT), GRAD_DOT), GRAD_DOT)
            tl.atomic_add(dq_acc_ptr + row_offsets + dims0[None, :], part, mask=row_ok[:, None], sem="relaxed")
            part = _grad_result(_mma_grad(g_operand, k1, _grad_acc(BLOCK_B, HALF, GRAD_DOT), GRAD_DOT), GRAD_DOT)
            tl.atomic_add(dq_acc_ptr + row_offsets + dims1[None, :], part, mask=row_ok[:, None], sem="relaxed")
    unscale = tl.load(unscale_ptr)
    out_stride = _output_stride(stride_k, D, DOT, EVEN_D)
    _store_rows(dk_ptr, cols, col_ok, out_stride, dims0, D, _grad_result(acc0, GRAD_DOT) * (inv_t * unscale))
    _store_rows(dk_ptr, cols, col_ok, out_stride, dims1, D, _grad_result(acc1, GRAD_DOT) * (inv_t * unscale))
    if LOGQ_GRAD and not ATOMIC_DQ:
        tl.store(dlogq_ptr + cols, column_sum, mask=col_ok & (pid_d == 0))

