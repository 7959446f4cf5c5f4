"""Backward kernels of the fused linear + cross-entropy.

Default: ONE pass over (token block x vocabulary tile) tiles (``_lce_backward_kernel``). A program recomputes its
logits tile once, turns it into the logits gradient dz once, and adds both of its products from that dz:
dHidden[tokens] += dz @ W[tile] and dWeight[tile] += dz^T @ H[tokens], D step by D step, with fp32 atomic adds
(order of the adds, hence the last bits, vary run to run). Work: 3F (logits, dHidden, dWeight) with F = 2 N D V.

Gradient filtering: a tile whose |dz| (before the upstream gradient) is below ``filter_eps`` everywhere skips
both products (2/3 of its work). Peaked softmaxes (trained LMs) leave most tiles below a bf16-negligible eps.

dWeight memory: the kernel adds into an fp32 buffer covering the vocabulary rows [v_start, v_start + v_count):
the whole [V, D] gradient, or a band of it that the launcher casts into the fp16/bf16 gradient before the next
band (so no fp32 [V, D] copy exists). By default the band and the dHidden fp32 accumulator are views of the
fp16/bf16 dWeight output's unwritten rows; NEED_HIDDEN / NEED_WEIGHT select the variant each stage of the plan
launches (``backward_plan.py``, ``triton_impl.run_plan``).

Vocabulary ordering (``vocab_order=True``): tiles walk the classes sorted by their mean logit over the batch,
so the few classes with large probabilities share tiles and more tiles fall below ``filter_eps`` entirely.

Deterministic variant (``torch.are_deterministic_algorithms_enabled()``): two kernels without atomics, each
program the only writer of its rows: token-parallel dHidden (``_lce_grad_hidden_kernel``) and vocabulary-parallel
dWeight (``_lce_grad_weight_kernel``), each recomputing the logits (4F); same filtering.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (_dot, _dz_tile, _grouped_tile, _load_grad_terms, _scaled_grad, _skip_tile,
                            _token_block_dz)


@triton.jit
def _lce_backward_kernel(h_ptr, w_ptr, b_ptr, slot_token_ptr, slot_row_ptr, slot_target_ptr, n_valid_ptr,
                         grad_scale_ptr, grad_scale_stride, max_ptr, log_sum_ptr, grad_h_ptr, grad_h2_ptr, grad_w_ptr,
                         grad_b_ptr, vocab_order_ptr,
                         N, V, v_start, v_count, D, stride_h, stride_w, stride_gh, stride_gh2, d_split, stride_gw,
                         smoothing, z_loss, softcap, filter_eps,
                         HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, HALF_GRAD: tl.constexpr, HEADROOM: tl.constexpr,
                         FILTER: tl.constexpr, NEED_HIDDEN: tl.constexpr, SPLIT_HIDDEN: tl.constexpr,
                         NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, VOCAB_ORDER: tl.constexpr,
                         DW_BY_ID: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                         GROUP_N: tl.constexpr):
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(v_count, BLOCK_V), GROUP_N)
    n_valid = tl.load(n_valid_ptr)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    if pid_n * BLOCK_N < n_valid:
        local_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = local_v < v_count
        offs_v = v_start + local_v
        if VOCAB_ORDER:     # tile positions walk a permutation of the vocabulary: offs_v become class ids
            offs_v = tl.load(vocab_order_ptr + offs_v, mask=v_mask, other=0)
        # dWeight rows: class ids when the buffer is the whole gradient, else positions in the band
        dw_rows = offs_v if DW_BY_ID else local_v
        rows, g, dz = _token_block_dz(h_ptr, w_ptr, b_ptr, offs_n, row_mask, offs_v, v_mask, slot_token_ptr,
                                      slot_row_ptr, slot_target_ptr, grad_scale_ptr, grad_scale_stride, max_ptr,
                                      log_sum_ptr, z_loss, D, stride_h, stride_w, smoothing, softcap, V, HAS_BIAS,
                                      HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        if not _skip_tile(dz, filter_eps, FILTER):
            if NEED_BIAS:
                tl.atomic_add(grad_b_ptr + offs_v, tl.sum(dz * g[:, None], axis=0), mask=v_mask, sem="relaxed")
            lo, scale = _scaled_grad(dz, g, w_ptr.dtype.element_ty, HALF_GRAD, HEADROOM)
            lo_t = tl.trans(lo)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                if NEED_HIDDEN:
                    w = tl.load(w_ptr + offs_v.to(tl.int64)[:, None] * stride_w + offs_d[None, :],
                                mask=v_mask[:, None] & d_mask[None, :], other=0.0)
                    part = _dot(lo, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), UPCAST, DOT_PRECISION)
                    h_mask = row_mask[:, None] & d_mask[None, :]
                    if SPLIT_HIDDEN:    # columns [d_split, D) of dHidden live in a second buffer
                        if d0 < d_split:
                            tl.atomic_add(grad_h_ptr + rows[:, None] * stride_gh + offs_d[None, :], part * scale,
                                          mask=h_mask, sem="relaxed")
                        else:
                            tl.atomic_add(grad_h2_ptr + rows[:, None] * stride_gh2 + (offs_d - d_split)[None, :],
                                          part * scale, mask=h_mask, sem="relaxed")
                    else:
                        tl.atomic_add(grad_h_ptr + rows[:, None] * stride_gh + offs_d[None, :], part * scale,
                                      mask=h_mask, sem="relaxed")
                if NEED_WEIGHT:
                    x = tl.load(h_ptr + rows[:, None] * stride_h + offs_d[None, :],
                                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                    part = _dot(lo_t, x, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32), UPCAST, DOT_PRECISION)
                    tl.atomic_add(grad_w_ptr + dw_rows.to(tl.int64)[:, None] * stride_gw + offs_d[None, :],
                                  part * scale, mask=v_mask[:, None] & d_mask[None, :], sem="relaxed")


@triton.jit
def _add_dot_into(out_ptrs, out_mask, lhs, scale, rhs_ptrs, rhs_mask, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """out += (lhs @ rhs) * scale, fp32 read-modify-write of a block that only this program writes."""
    rhs = tl.load(rhs_ptrs, mask=rhs_mask, other=0.0)
    acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
    part = _dot(lhs, rhs, tl.zeros(acc.shape, dtype=tl.float32), UPCAST, DOT_PRECISION)
    tl.store(out_ptrs, acc + part * scale, mask=out_mask)


@triton.jit
def _lce_grad_hidden_kernel(h_ptr, w_ptr, b_ptr, slot_token_ptr, slot_row_ptr, slot_target_ptr, n_valid_ptr,
                            grad_scale_ptr, grad_scale_stride, max_ptr, log_sum_ptr, grad_h_ptr,
                            V, D, stride_h, stride_w, stride_gh, smoothing, z_loss, softcap, filter_eps,
                            HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, HALF_GRAD: tl.constexpr, HEADROOM: tl.constexpr,
                            FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    n_valid = tl.load(n_valid_ptr)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    if tl.program_id(0) * BLOCK_N < n_valid:
        rows, target, row_max, log_sum, g, z_term = _load_grad_terms(
            offs_n, row_mask, slot_token_ptr, slot_row_ptr, slot_target_ptr, grad_scale_ptr, grad_scale_stride,
            max_ptr, log_sum_ptr, z_loss)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            dz = _dz_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, target, row_max, log_sum, z_term, D,
                          stride_h, stride_w, smoothing, softcap, V, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION,
                          BLOCK_N, BLOCK_V, BLOCK_D)
            if not _skip_tile(dz, filter_eps, FILTER):
                lo, scale = _scaled_grad(dz, g, w_ptr.dtype.element_ty, HALF_GRAD, HEADROOM)
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    d_mask = offs_d < D
                    _add_dot_into(grad_h_ptr + rows[:, None] * stride_gh + offs_d[None, :],
                                  row_mask[:, None] & d_mask[None, :], lo, scale,
                                  w_ptr + offs_v.to(tl.int64)[:, None] * stride_w + offs_d[None, :],
                                  v_mask[:, None] & d_mask[None, :], UPCAST, DOT_PRECISION)


@triton.jit
def _lce_grad_weight_kernel(h_ptr, w_ptr, b_ptr, slot_token_ptr, slot_row_ptr, slot_target_ptr, n_valid_ptr,
                            grad_scale_ptr, grad_scale_stride, max_ptr, log_sum_ptr, grad_w_ptr, grad_b_ptr,
                            V, v_start, v_count, D, stride_h, stride_w, stride_gw, smoothing, z_loss, softcap,
                            filter_eps,
                            HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, HALF_GRAD: tl.constexpr, HEADROOM: tl.constexpr,
                            FILTER: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    local_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)   # rows of this band (its sums: grad_w_ptr)
    offs_v = v_start + local_v
    v_mask = local_v < v_count
    n_valid = tl.load(n_valid_ptr)
    bias_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, n_valid, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_mask = offs_n < n_valid
        rows, g, dz = _token_block_dz(h_ptr, w_ptr, b_ptr, offs_n, row_mask, offs_v, v_mask, slot_token_ptr,
                                      slot_row_ptr, slot_target_ptr, grad_scale_ptr, grad_scale_stride, max_ptr,
                                      log_sum_ptr, z_loss, D, stride_h, stride_w, smoothing, softcap, V, HAS_BIAS,
                                      HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        if not _skip_tile(dz, filter_eps, FILTER):
            if NEED_BIAS:
                bias_acc += tl.sum(dz * g[:, None], axis=0)
            if NEED_WEIGHT:
                lo, scale = _scaled_grad(dz, g, w_ptr.dtype.element_ty, HALF_GRAD, HEADROOM)
                lo_t = tl.trans(lo)
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    d_mask = offs_d < D
                    _add_dot_into(grad_w_ptr + local_v.to(tl.int64)[:, None] * stride_gw + offs_d[None, :],
                                  v_mask[:, None] & d_mask[None, :], lo_t, scale,
                                  h_ptr + rows[:, None] * stride_h + offs_d[None, :],
                                  row_mask[:, None] & d_mask[None, :], UPCAST, DOT_PRECISION)
    if NEED_BIAS:
        tl.store(grad_b_ptr + offs_v, bias_acc, mask=v_mask)
