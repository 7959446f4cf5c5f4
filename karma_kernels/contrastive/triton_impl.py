"""Triton kernels of ``contrastive_loss`` (semantics in ``reference.py``).

Forward: one program per block of query rows loops over key tiles with an online max / sum-exp; only per-row
statistics reach memory (``stats`` [3, B], same layout as ``torch_impl``). For ``symmetric=True`` the same tile pass
also writes, per row block, the partial column max / sum-exp, which are reduced to the column lse in torch.

Backward recomputes logit tiles: a dQ kernel parallel over row blocks and a dK kernel parallel over key blocks,
each owning its output rows, so the result is deterministic (no atomics). Both kernels also split D into
``BLOCK_DV`` slices over a second grid axis (any D works: loads are masked at the tail). dT comes from per-row
partial sums q_i . dq_i reduced in torch, dlogq from the dK kernel's column sums.

Precision: loads are upcast to float32 before any elementwise arithmetic; logits are accumulated in float32.
On a GPU, float16/bfloat16 tiles go to ``tl.dot`` in their own dtype (exact products, float32 accumulation) and
float32 tiles use IEEE float32 dot (no TF32); under the Triton interpreter every dot runs on float32 values,
because the interpreter's half-precision dot is wrong. float64 inputs are not supported here (backend "torch").

Block sizes are fixed by ``default_config``; ``KARMA_AUTOTUNE=1`` (GPU only, never under the interpreter) tunes
them instead. The launchers make no host synchronisation: the temperature is read by the kernels from memory.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backend import interpreter_active


@dataclass(frozen=True)
class Config:
    block_b: int        # query rows per tile
    block_m: int        # keys per tile
    block_d: int        # D chunk of the logit dot products
    block_dv: int       # D slice of a gradient program's output
    num_warps: int = 4
    num_stages: int = 2


def default_config(dim: int, dtype: torch.dtype = torch.bfloat16, pairwise: bool = False) -> Tuple[Config, Config]:
    """(forward, backward) configs. Small tiles under the interpreter so tests cover several tiles per axis.

    On GPUs: shapes chosen so that the sm_90 builds of every mode keep (nearly) all values in registers
    (checked with ptxas' resource usage); the pairwise forward carries more per-element state than softmax."""
    if interpreter_active():
        small = Config(16, 16, 16, 16, 1, 1)
        return small, small
    half = dtype != torch.float32
    if pairwise:
        forward = Config(64, 64, 64, 0, 8, 3) if half else Config(128, 32, 32, 0, 8, 2)
    else:
        forward = Config(128, 64, 64, 0, 8, 3) if half else Config(128, 64, 32, 0, 8, 3)
    return forward, Config(64, 64, 32, min(triton.next_power_of_2(dim), 128), 8, 1)


def triton_rejects(query: torch.Tensor) -> Optional[str]:
    if query.dtype == torch.float64:
        return "float64 inputs are not supported by the Triton kernels (use backend='torch')"
    return None


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
def _row_grad_inputs(coef_ptr, stats_ptr, rows, row_ok, B):
    """Per-row upstream coefficient and the three saved forward statistics of a block of rows."""
    row_coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    row_stat0 = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    row_stat1 = tl.load(stats_ptr + B + rows, mask=row_ok, other=0.0)
    row_stat2 = tl.load(stats_ptr + 2 * B + rows, mask=row_ok, other=0.0)
    return row_coef, row_stat0, row_stat1, row_stat2


@triton.jit
def _logits_tile(q_ptr, k_ptr, logq_ptr, inv_t, rows, cols, row_ok, col_ok, D, stride_q, stride_k,
                 HAS_LOGQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """s[BLOCK_B, BLOCK_M] = (q[rows] . k[cols]) * inv_t - logq[cols], float32."""
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q
    k_rows = k_ptr + cols.to(tl.int64)[:, None] * stride_k
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        q_tile = tl.load(q_rows + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_tile = tl.load(k_rows + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            if IEEE:
                acc = tl.dot(q_tile.to(tl.float32), tl.trans(k_tile.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(q_tile.to(tl.float32), tl.trans(k_tile.to(tl.float32)), acc)
        else:
            acc = tl.dot(q_tile, tl.trans(k_tile), acc)
    s = acc * inv_t
    if HAS_LOGQ:
        s -= tl.load(logq_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return s


@triton.jit
def _valid_tile(rows, cols, row_ok, col_ok, target, positive_id, key_ids_ptr, HAS_KEY_IDS: tl.constexpr):
    """(valid, is_target) masks of a tile: key j is valid for row i unless it is a false negative."""
    is_target = cols[None, :] == target[:, None]
    valid = row_ok[:, None] & col_ok[None, :]
    if HAS_KEY_IDS:
        key_id = tl.load(key_ids_ptr + cols, mask=col_ok, other=0)
        valid = valid & ((key_id[None, :] != positive_id[:, None]) | is_target)
    return valid, is_target


@triton.jit
def _softplus_sigmoid(x):
    """Stable softplus(x) and sigmoid(x) from one exp."""
    e = tl.exp(-tl.abs(x))
    # log1p(e) without libdevice: the series is exact to float32 for small e
    log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    softplus = tl.maximum(x, 0.0) + log1p_e
    sigmoid = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return softplus, sigmoid


@triton.jit
def _forward_kernel(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, temperature_ptr, loss_ptr, stats_ptr,
                    col_max_ptr, col_sum_ptr, B, M, D, stride_q, stride_k,
                    HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr, PAIRWISE: tl.constexpr,
                    SYMMETRIC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows, row_ok, target, positive_id = _query_block(pid * BLOCK_B, B, target_ptr, key_ids_ptr, HAS_KEY_IDS,
                                                     BLOCK_B)
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)

    positive = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if PAIRWISE:
        # the positive logit is needed before the first tile: an indexed dot with the target key
        dot = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (dims < D)[None, :]
            q_tile = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_q + dims[None, :], mask=mask, other=0.0)
            k_tile = tl.load(k_ptr + target[:, None] * stride_k + dims[None, :], mask=mask, other=0.0)
            dot += tl.sum(q_tile.to(tl.float32) * k_tile.to(tl.float32), axis=1)
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
        s = _logits_tile(q_ptr, k_ptr, logq_ptr, inv_t, rows, cols, row_ok, col_ok, D, stride_q, stride_k,
                         HAS_LOGQ, BLOCK_B, BLOCK_M, BLOCK_D, DOT_FP32, IEEE)
        valid, is_target = _valid_tile(rows, cols, row_ok, col_ok, target, positive_id, key_ids_ptr, HAS_KEY_IDS)
        if PAIRWISE:
            negative = valid & (~is_target)
            softplus, sigmoid = _softplus_sigmoid(s - positive[:, None])
            margin_sum += tl.sum(tl.where(negative, softplus, 0.0), axis=1)
            sigmoid_sum += tl.sum(tl.where(negative, sigmoid, 0.0), axis=1)
            negatives += tl.sum(negative.to(tl.float32), axis=1)
        else:
            masked = tl.where(valid, s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(masked, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(masked - new_max[:, None]), axis=1)
            row_max = new_max
            positive += tl.sum(tl.where(is_target & row_ok[:, None], s, 0.0), axis=1)
            if SYMMETRIC:
                tile_col_max = tl.max(masked, axis=0)
                shift = tl.where(tile_col_max > float("-inf"), tile_col_max, 0.0)
                tile_col_sum = tl.sum(tl.exp(masked - shift[None, :]), axis=0)
                tl.store(col_max_ptr + pid * M + cols, tile_col_max, mask=col_ok)
                tl.store(col_sum_ptr + pid * M + cols, tile_col_sum, mask=col_ok)
    if PAIRWISE:
        inv_count = tl.where(negatives > 0, 1.0 / tl.maximum(negatives, 1.0), 0.0)
        tl.store(loss_ptr + rows, margin_sum * inv_count, mask=row_ok)
        tl.store(stats_ptr + rows, positive, mask=row_ok)
        tl.store(stats_ptr + B + rows, inv_count, mask=row_ok)
        tl.store(stats_ptr + 2 * B + rows, sigmoid_sum * inv_count, mask=row_ok)
    else:
        lse = row_max + tl.log(tl.where(row_ok, row_sum, 1.0))
        tl.store(loss_ptr + rows, lse - positive, mask=row_ok)
        tl.store(stats_ptr + rows, lse, mask=row_ok)
        tl.store(stats_ptr + 2 * B + rows, positive, mask=row_ok)


@triton.jit
def _grad_tile(s, rows, cols, valid, is_target, row_coef, row_stat0, row_stat1, row_stat2, col_coef, col_lse,
               PAIRWISE: tl.constexpr, SYMMETRIC: tl.constexpr):
    """G = d(sum_i coef_i loss_i) / d s for one tile (see torch_impl for the formulas)."""
    if PAIRWISE:
        # stats: target logit, 1/count, mean sigmoid
        _, sigmoid = _softplus_sigmoid(s - row_stat0[:, None])
        negative = valid & (~is_target)
        g = tl.where(negative, sigmoid, 0.0) * (row_coef * row_stat1)[:, None]
        g -= tl.where(is_target, (row_coef * row_stat2)[:, None], 0.0)
    else:
        # exp of masked entries is never formed (a false negative may sit far above the row's lse)
        g = tl.exp(tl.where(valid, s - row_stat0[:, None], float("-inf"))) * row_coef[:, None]
        g -= tl.where(is_target, row_coef[:, None], 0.0)
        if SYMMETRIC:
            g += tl.exp(tl.where(valid, s - col_lse[None, :], float("-inf"))) * col_coef[None, :]
            g -= tl.where(rows[:, None] == cols[None, :], col_coef[None, :], 0.0)
    return g


@triton.jit
def _grad_query_kernel(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, temperature_ptr, stats_ptr, coef_ptr,
                       dq_ptr, dot_partial_ptr, B, M, D, stride_q, stride_k,
                       HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr, PAIRWISE: tl.constexpr,
                       SYMMETRIC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows, row_ok, target, positive_id = _query_block(pid * BLOCK_B, B, target_ptr, key_ids_ptr, HAS_KEY_IDS,
                                                     BLOCK_B)
    dims = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = dims < D
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    row_coef, row_stat0, row_stat1, row_stat2 = _row_grad_inputs(coef_ptr, stats_ptr, rows, row_ok, B)

    acc = tl.zeros((BLOCK_B, BLOCK_DV), dtype=tl.float32)
    for n0 in range(0, M, BLOCK_M):
        cols = n0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        s = _logits_tile(q_ptr, k_ptr, logq_ptr, inv_t, rows, cols, row_ok, col_ok, D, stride_q, stride_k,
                         HAS_LOGQ, BLOCK_B, BLOCK_M, BLOCK_D, DOT_FP32, IEEE)
        valid, is_target = _valid_tile(rows, cols, row_ok, col_ok, target, positive_id, key_ids_ptr, HAS_KEY_IDS)
        # defined afresh in each iteration (not loop-carried): their shape is BLOCK_M, the rows' is BLOCK_B
        if SYMMETRIC:  # M == B: column j's coefficient and lse are row j's
            col_coef = tl.load(coef_ptr + cols, mask=col_ok, other=0.0)
            col_lse = tl.load(stats_ptr + B + cols, mask=col_ok, other=0.0)
        else:
            col_coef = tl.zeros((BLOCK_M,), dtype=tl.float32)
            col_lse = tl.zeros((BLOCK_M,), dtype=tl.float32)
        g = _grad_tile(s, rows, cols, valid, is_target, row_coef, row_stat0, row_stat1, row_stat2, col_coef,
                       col_lse, PAIRWISE, SYMMETRIC)
        k_slice = tl.load(k_ptr + cols.to(tl.int64)[:, None] * stride_k + dims[None, :],
                          mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            if IEEE:
                acc = tl.dot(g, k_slice.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(g, k_slice.to(tl.float32), acc)
        else:
            acc = tl.dot(g.to(k_slice.dtype), k_slice, acc)
    dq = acc * inv_t
    out_mask = row_ok[:, None] & d_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * stride_q + dims[None, :]
    tl.store(dq_ptr + offsets, dq.to(dq_ptr.dtype.element_ty), mask=out_mask)
    # q_i . dq_i over this D slice, in float32 before rounding dq: the temperature gradient's pieces
    q_slice = tl.load(q_ptr + offsets, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(dot_partial_ptr + pid_d * B + rows, tl.sum(q_slice * dq, axis=1), mask=row_ok)


@triton.jit
def _grad_keys_kernel(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, temperature_ptr, stats_ptr, coef_ptr,
                      dk_ptr, dlogq_ptr, B, M, D, stride_q, stride_k,
                      HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr, LOGQ_GRAD: tl.constexpr,
                      PAIRWISE: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                      DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    dims = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = dims < D
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    col_coef = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_lse = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if SYMMETRIC:
        col_coef = tl.load(coef_ptr + cols, mask=col_ok, other=0.0)
        col_lse = tl.load(stats_ptr + B + cols, mask=col_ok, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    column_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows, row_ok, target, positive_id = _query_block(r0, B, target_ptr, key_ids_ptr, HAS_KEY_IDS, BLOCK_B)
        row_coef, row_stat0, row_stat1, row_stat2 = _row_grad_inputs(coef_ptr, stats_ptr, rows, row_ok, B)
        s = _logits_tile(q_ptr, k_ptr, logq_ptr, inv_t, rows, cols, row_ok, col_ok, D, stride_q, stride_k,
                         HAS_LOGQ, BLOCK_B, BLOCK_M, BLOCK_D, DOT_FP32, IEEE)
        valid, is_target = _valid_tile(rows, cols, row_ok, col_ok, target, positive_id, key_ids_ptr, HAS_KEY_IDS)
        g = _grad_tile(s, rows, cols, valid, is_target, row_coef, row_stat0, row_stat1, row_stat2, col_coef,
                       col_lse, PAIRWISE, SYMMETRIC)
        g = tl.where(row_ok[:, None], g, 0.0)
        q_slice = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_q + dims[None, :],
                          mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            if IEEE:
                acc = tl.dot(tl.trans(g), q_slice.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(g), q_slice.to(tl.float32), acc)
        else:
            acc = tl.dot(tl.trans(g.to(q_slice.dtype)), q_slice, acc)
        if LOGQ_GRAD:
            column_sum += tl.sum(g, axis=0)
    dk = acc * inv_t
    offsets = cols.to(tl.int64)[:, None] * stride_k + dims[None, :]
    tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])
    if LOGQ_GRAD:
        tl.store(dlogq_ptr + cols, -column_sum, mask=col_ok & (pid_d == 0))


def _autotuned(kernel):
    """``kernel`` wrapped in triton.autotune over a few block shapes (KARMA_AUTOTUNE=1 only)."""
    configs = []
    for block_b, block_m, warps, stages in ((64, 64, 4, 2), (128, 64, 8, 3), (64, 128, 8, 3), (128, 128, 8, 2)):
        meta = {"BLOCK_B": block_b, "BLOCK_M": block_m, "BLOCK_D": 64}
        configs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return triton.autotune(configs=configs, key=["B", "M", "D"])(kernel)


@functools.lru_cache(maxsize=None)
def _tuned_kernels():
    return _autotuned(_forward_kernel), _autotuned(_grad_query_kernel), _autotuned(_grad_keys_kernel)


def _use_autotune() -> bool:
    return os.environ.get("KARMA_AUTOTUNE") == "1" and not interpreter_active()


def _precision_flags(dtype: torch.dtype) -> Tuple[bool, bool]:
    """(DOT_FP32, IEEE): dot on float32 values (always under the interpreter), IEEE float32 for float32 inputs."""
    return interpreter_active() or dtype == torch.float32, dtype == torch.float32 and not interpreter_active()


def contrastive_forward(query, keys, target, temperature, key_ids, logq, mode, symmetric,
                        config: Optional[Config] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [B] float32 and statistics [3, B] float32 (layout of torch_impl)."""
    query, keys = query.contiguous(), keys.contiguous()
    batch, dim = query.shape
    num_keys = keys.shape[0]
    fwd_config = config or default_config(dim, query.dtype, mode == "pairwise")[0]
    loss = torch.empty(batch, dtype=torch.float32, device=query.device)
    stats = torch.zeros(3, batch, dtype=torch.float32, device=query.device)
    dot_fp32, ieee = _precision_flags(query.dtype)
    # symmetric keeps the fixed config: the autotuner's trial runs with other BLOCK_B would leave stale partial
    # column statistics in rows the chosen config does not write
    tuned = _use_autotune() and config is None and not symmetric
    partial_rows = triton.cdiv(batch, fwd_config.block_b) if symmetric else 1  # one row per row block
    col_max = torch.empty(partial_rows, num_keys if symmetric else 1, dtype=torch.float32, device=query.device)
    col_sum = torch.empty_like(col_max)
    if symmetric:
        col_max.fill_(float("-inf"))
        col_sum.zero_()
    args = (query, keys, target, key_ids if key_ids is not None else target,
            logq if logq is not None else loss, temperature, loss, stats, col_max, col_sum,
            batch, num_keys, dim, query.stride(0), keys.stride(0))
    flags = dict(HAS_KEY_IDS=key_ids is not None, HAS_LOGQ=logq is not None, PAIRWISE=mode == "pairwise",
                 SYMMETRIC=symmetric, DOT_FP32=dot_fp32, IEEE=ieee)
    if tuned:
        _tuned_kernels()[0][lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]),)](*args, **flags)
    else:
        _forward_kernel[(triton.cdiv(batch, fwd_config.block_b),)](
            *args, **flags, BLOCK_B=fwd_config.block_b, BLOCK_M=fwd_config.block_m, BLOCK_D=fwd_config.block_d,
            num_warps=fwd_config.num_warps, num_stages=fwd_config.num_stages)
    if symmetric:
        column_max = col_max.amax(dim=0)
        column_sum = (col_sum * torch.exp(col_max - column_max[None, :])).sum(dim=0)
        stats[1] = column_max + column_sum.log()
        loss = (loss + stats[1] - stats[2]) / 2
    return loss, stats


def contrastive_backward(row_coef, query, keys, target, temperature, key_ids, logq, mode, symmetric, stats,
                         want_logq_grad: bool = False, config: Optional[Config] = None):
    """(dq, dk, dtemperature, dlogq or None) of sum_i row_coef_i * loss_i, recomputing logit tiles."""
    query, keys = query.contiguous(), keys.contiguous()
    batch, dim = query.shape
    num_keys = keys.shape[0]
    bwd_config = config or default_config(dim, query.dtype, mode == "pairwise")[1]
    # symmetric: each direction carries half of the row's upstream gradient
    row_coef = (row_coef * 0.5 if symmetric else row_coef).to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    dq = torch.empty_like(query)
    dk = torch.empty_like(keys)
    dlogq = torch.empty(num_keys, dtype=torch.float32, device=query.device) if want_logq_grad else None
    dot_fp32, ieee = _precision_flags(query.dtype)
    tuned = _use_autotune() and config is None
    block_dv = bwd_config.block_dv if not tuned else min(triton.next_power_of_2(dim), 128)
    d_slices = triton.cdiv(dim, block_dv)
    dot_partial = torch.empty(d_slices, batch, dtype=torch.float32, device=query.device)
    key_ids_arg = key_ids if key_ids is not None else target
    logq_arg = logq if logq is not None else row_coef
    common = dict(HAS_KEY_IDS=key_ids is not None, HAS_LOGQ=logq is not None, PAIRWISE=mode == "pairwise",
                  SYMMETRIC=symmetric, BLOCK_DV=block_dv, DOT_FP32=dot_fp32, IEEE=ieee)
    q_args = (query, keys, target, key_ids_arg, logq_arg, temperature, stats, row_coef, dq, dot_partial,
              batch, num_keys, dim, query.stride(0), keys.stride(0))
    k_args = (query, keys, target, key_ids_arg, logq_arg, temperature, stats, row_coef, dk,
              dlogq if dlogq is not None else row_coef, batch, num_keys, dim, query.stride(0), keys.stride(0))
    if tuned:
        _, tuned_q, tuned_k = _tuned_kernels()
        tuned_q[lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), d_slices)](*q_args, **common)
        tuned_k[lambda meta: (triton.cdiv(num_keys, meta["BLOCK_M"]), d_slices)](
            *k_args, LOGQ_GRAD=want_logq_grad, **common)
    else:
        blocks = dict(BLOCK_B=bwd_config.block_b, BLOCK_M=bwd_config.block_m, BLOCK_D=bwd_config.block_d,
                      num_warps=bwd_config.num_warps, num_stages=bwd_config.num_stages)
        _grad_query_kernel[(triton.cdiv(batch, bwd_config.block_b), d_slices)](*q_args, **common, **blocks)
        _grad_keys_kernel[(triton.cdiv(num_keys, bwd_config.block_m), d_slices)](
            *k_args, LOGQ_GRAD=want_logq_grad, **common, **blocks)
    dtemperature = -dot_partial.sum() / temperature.to(torch.float32)
    return dq, dk, dtemperature, dlogq
