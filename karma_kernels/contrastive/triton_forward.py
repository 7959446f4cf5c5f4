"""Forward Triton kernel of ``contrastive_loss``: per-row loss and statistics, never the B x M logits.

One program per block of query rows. For D <= BLOCK_D (``RESIDENT``, every default config up to D = 256) the query
block is loaded once (as two D halves) and each key tile costs the dots of K = D; the key loop is software-pipelined by
Triton (``num_stages`` >= 2: the next key tiles arrive by asynchronous copies while the current one is reduced).
Larger D runs the dot product in BLOCK_D chunks. Only per-row statistics reach memory (``stats`` [5, B], layout of
``torch_impl``: a row's lse as its shift m and log-sum l, never rounded into one float32). The symmetric mode has
its own kernel (``_symmetric_forward_kernel``): row and column statistics from one pass over the tiles.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_tiles import _load_value, _logit_tile, _query_block, _resident_halves, _softplus_sigmoid


@triton.jit
def _finite_shift(running_max):
    """The shift an online logsumexp subtracts: its running max, or 0 once a +inf logit was seen (logq = -inf),
    so that the sum becomes +inf and the lse +inf, not NaN."""
    return tl.where(running_max == float("inf"), 0.0, running_max)


@triton.jit
def _online_lse(running_max, running_sum, masked, AXIS: tl.constexpr):
    """(max, sum exp(x - shift)) after folding a tile's ``masked`` logits (-inf where invalid) along ``AXIS``
    into a running pair (start: a finite -1e30 and 0, so that exp(m_old - m_new) stays defined while only masked
    entries were seen)."""
    new_max = tl.maximum(running_max, tl.max(masked, axis=AXIS))
    shift = _finite_shift(new_max)
    tile_sum = tl.sum(tl.exp(masked - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return new_max, running_sum * tl.exp(_finite_shift(running_max) - shift) + tile_sum


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
    q0, q1 = _resident_halves(q_ptr, rows, row_ok, stride_q, dims0, dims1, D, EVEN_D, RESIDENT, DOT)

    positive = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if PAIRWISE:
        # the positive logit is needed before the first tile: an indexed dot with the target key
        dot = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, D, 64):
            chunk = d0 + tl.arange(0, 64)
            q_part = _load_value(q_ptr, rows, row_ok, stride_q, chunk, D, False, DOT)
            k_part = _load_value(k_ptr, target, row_ok, stride_k, chunk, D, False, DOT)
            dot += tl.sum(q_part * k_part, axis=1)
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
        k0, k1 = _resident_halves(k_ptr, cols, col_ok, stride_k, dims0, dims1, D, EVEN_D, RESIDENT, DOT)
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
            row_max, row_sum = _online_lse(row_max, row_sum, masked, 1)
            positive += tl.sum(tl.where(is_target & row_ok[:, None], s, 0.0), axis=1)
    if PAIRWISE:
        inv_count = tl.where(negatives > 0, 1.0 / tl.maximum(negatives, 1.0), 0.0)
        tl.store(loss_ptr + rows, margin_sum * inv_count, mask=row_ok)
        tl.store(stats_ptr + rows, positive, mask=row_ok)
        tl.store(stats_ptr + B + rows, inv_count, mask=row_ok)
        tl.store(stats_ptr + 2 * B + rows, sigmoid_sum * inv_count, mask=row_ok)
    else:
        shift = _finite_shift(row_max)
        log_sum = tl.log(tl.where(row_ok, row_sum, 1.0))
        tl.store(loss_ptr + rows, (shift - positive) + log_sum, mask=row_ok)
        tl.store(stats_ptr + rows, shift, mask=row_ok)
        tl.store(stats_ptr + 2 * B + rows, positive, mask=row_ok)
        tl.store(stats_ptr + 3 * B + rows, log_sum, mask=row_ok)


@triton.jit
def _symmetric_forward_kernel(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, temperature_ptr, row_part_ptr,
                              col_part_ptr, B, M, D, stride_q, stride_k,
                              HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr, RESIDENT: tl.constexpr,
                              EVEN_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """Row and column statistics of the symmetric mode in one pass over the logit tiles (each tile formed once).

    Program (r, c) of the (S_r, S_c) grid owns the r-th of S_r contiguous ranges of row blocks and the c-th of S_c
    ranges of key tiles. Per row block (query block resident) it walks its key tiles, keeping the rows' online
    (max, sum exp) in registers, and writes them once to ``row_part`` [3, S_c, B] (max, sum, target logit) at
    split c. The columns' online pair over its row range lives in ``col_part`` [2, S_r, M] at split r: slots no
    other program touches, read, updated and written back per tile (the first row block only writes; a barrier
    per row block orders a slot's store before its next read by another thread of the program). The
    launcher merges the S_c / S_r partial pairs (a logsumexp): O((S_r + S_c) (B + M)) memory, S_r, S_c small.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    splits_r = tl.num_programs(0)
    splits_c = tl.num_programs(1)
    row_blocks = tl.cdiv(B, BLOCK_B)
    key_tiles = tl.cdiv(M, BLOCK_M)
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    HALF: tl.constexpr = BLOCK_D // 2
    dims0 = tl.arange(0, HALF)
    dims1 = dims0 + HALF
    first_block = pid_r * row_blocks // splits_r
    col_max_ptr = col_part_ptr + pid_r.to(tl.int64) * M
    col_sum_ptr = col_max_ptr + splits_r.to(tl.int64) * M
    for block in range(first_block, (pid_r + 1) * row_blocks // splits_r):
        rows, row_ok, target, positive_id = _query_block(block * BLOCK_B, B, target_ptr, key_ids_ptr,
                                                         HAS_KEY_IDS, BLOCK_B)
        q0, q1 = _resident_halves(q_ptr, rows, row_ok, stride_q, dims0, dims1, D, EVEN_D, RESIDENT, DOT)
        row_max = tl.full((BLOCK_B,), -1e30, dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
        positive = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for tile in range(pid_c * key_tiles // splits_c, (pid_c + 1) * key_tiles // splits_c):
            cols = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            col_ok = cols < M
            k0, k1 = _resident_halves(k_ptr, cols, col_ok, stride_k, dims0, dims1, D, EVEN_D, RESIDENT, DOT)
            s, valid, is_target = _logit_tile(q0, q1, k0, k1, q_ptr, k_ptr, logq_ptr, key_ids_ptr, rows, cols,
                                              row_ok, col_ok, target, positive_id, inv_t, D, stride_q, stride_k,
                                              HAS_KEY_IDS, HAS_LOGQ, RESIDENT, BLOCK_B, BLOCK_M, BLOCK_D, DOT)
            masked = tl.where(valid, s, float("-inf"))
            row_max, row_sum = _online_lse(row_max, row_sum, masked, 1)
            positive += tl.sum(tl.where(is_target, s, 0.0), axis=1)
            seen = col_ok & (block > first_block)
            col_max = tl.load(col_max_ptr + cols, mask=seen, other=-1e30)
            col_sum = tl.load(col_sum_ptr + cols, mask=seen, other=0.0)
            col_max, col_sum = _online_lse(col_max, col_sum, masked, 0)
            tl.store(col_max_ptr + cols, col_max, mask=col_ok)
            tl.store(col_sum_ptr + cols, col_sum, mask=col_ok)
        # the next row block reads back the column slots this one wrote (other threads' stores, when a range has
        # one key tile): a CTA barrier orders them (the key loop is the one Triton pipelines, not this one)
        tl.debug_barrier()
        row_offsets = pid_c.to(tl.int64) * B + rows
        split_stride = splits_c.to(tl.int64) * B
        tl.store(row_part_ptr + row_offsets, row_max, mask=row_ok)
        tl.store(row_part_ptr + split_stride + row_offsets, row_sum, mask=row_ok)
        tl.store(row_part_ptr + 2 * split_stride + row_offsets, positive, mask=row_ok)
