"""Forward Triton kernel of ``contrastive_loss``: per-row loss and statistics, never the B x M logits.

One program per block of query rows. For D <= BLOCK_D (``RESIDENT``, every default config up to D = 256) the query
block is loaded once (as two D halves) and each key tile costs the dots of K = D; the key loop is software-pipelined by
Triton (``num_stages`` >= 2: the next key tiles arrive by asynchronous copies while the current one is reduced).
Larger D runs the dot product in BLOCK_D chunks. Only per-row statistics reach memory (``stats`` [3, B], layout of
``torch_impl``). The symmetric mode's column lse is this same kernel run on (keys, queries) by the launcher.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_tiles import _load_rows, _logit_tile, _query_block, _softplus_sigmoid


@triton.jit
def _forward_kernel(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, temperature_ptr, loss_ptr, stats_ptr,
                    B, M, D, stride_q, stride_k,
                    HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr, PAIRWISE: tl.constexpr,
                    RESIDENT: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    pid = tl.program_id(0)
    rows, row_ok, target, positive_id = _query_block(pid * BLOCK_B, B, target_ptr, key_ids_ptr, HAS_KEY_IDS,
                                                     BLOCK_B)
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    HALF: tl.constexpr = BLOCK_D // 2
    dims0 = tl.arange(0, HALF)
    dims1 = dims0 + HALF
    if RESIDENT:
        q0 = _load_rows(q_ptr, rows, row_ok, stride_q, dims0, D, EVEN_D)
        q1 = _load_rows(q_ptr, rows, row_ok, stride_q, dims1, D, EVEN_D)
    else:
        q0 = 0.0
        q1 = 0.0

    positive = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if PAIRWISE:
        # the positive logit is needed before the first tile: an indexed dot with the target key
        dot = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, D, 64):
            chunk = d0 + tl.arange(0, 64)
            q_part = _load_rows(q_ptr, rows, row_ok, stride_q, chunk, D, False)
            k_part = _load_rows(k_ptr, target, row_ok, stride_k, chunk, D, False)
            dot += tl.sum(q_part.to(tl.float32) * k_part.to(tl.float32), axis=1)
        positive = dot * inv_t
        if HAS_LOGQ:
            positive -= tl.load(logq_ptr + target, mask=row_ok, other=0.0).to(tl.float32)

    # finite start so that exp(m_old - m_new) stays defined while a row has seen only masked keys
    row_max = tl.full((BLOCK_B,), -1e30, dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    margin_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    sigmoid_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    negatives = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for n0 in range(0, M, BLOCK_M):
        cols = n0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        if RESIDENT:
            k0 = _load_rows(k_ptr, cols, col_ok, stride_k, dims0, D, EVEN_D)
            k1 = _load_rows(k_ptr, cols, col_ok, stride_k, dims1, D, EVEN_D)
        else:   # the logits come from D chunks
            k0 = 0.0
            k1 = 0.0
        s, valid, is_target = _logit_tile(q0, q1, k0, k1, q_ptr, k_ptr, logq_ptr, key_ids_ptr, rows, cols, row_ok,
                                          col_ok, target, positive_id, inv_t, D, stride_q, stride_k, HAS_KEY_IDS,
                                          HAS_LOGQ, RESIDENT, BLOCK_B, BLOCK_M, BLOCK_D, DOT)
        if PAIRWISE:
            negative = valid & (~is_target)
            softplus, sigmoid = _softplus_sigmoid(s - positive[:, None])
            margin_sum += tl.sum(tl.where(negative, softplus, 0.0), axis=1)
            sigmoid_sum += tl.sum(tl.where(negative, sigmoid, 0.0), axis=1)
            negatives += tl.sum(negative.to(tl.float32), axis=1)
        else:
            masked = tl.where(valid, s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(masked, axis=1))
            # once a +inf logit (logq = -inf) is seen the shift is 0 and the sum +inf: lse = +inf, not NaN
            old_shift = tl.where(row_max == float("inf"), 0.0, row_max)
            shift = tl.where(new_max == float("inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp(old_shift - shift) + tl.sum(tl.exp(masked - shift[:, None]), axis=1)
            row_max = new_max
            positive += tl.sum(tl.where(is_target & row_ok[:, None], s, 0.0), axis=1)
    if PAIRWISE:
        inv_count = tl.where(negatives > 0, 1.0 / tl.maximum(negatives, 1.0), 0.0)
        tl.store(loss_ptr + rows, margin_sum * inv_count, mask=row_ok)
        tl.store(stats_ptr + rows, positive, mask=row_ok)
        tl.store(stats_ptr + B + rows, inv_count, mask=row_ok)
        tl.store(stats_ptr + 2 * B + rows, sigmoid_sum * inv_count, mask=row_ok)
    else:
        lse = tl.where(row_max == float("inf"), 0.0, row_max) + tl.log(tl.where(row_ok, row_sum, 1.0))
        tl.store(loss_ptr + rows, lse - positive, mask=row_ok)
        tl.store(stats_ptr + rows, lse, mask=row_ok)
        tl.store(stats_ptr + 2 * B + rows, positive, mask=row_ok)
