"""Forward kernel of the fused linear + cross-entropy: a 2-D grid of (token block x vocabulary split).

A program owns BLOCK_N tokens and one split of the vocabulary (a run of BLOCK_V-wide tiles). Programs are ordered
in groups of GROUP_N token blocks that walk the splits together, so a split's weight tiles are read from memory once
per group and from L2 by the others. Each logits tile is built from BLOCK_D-wide ``tl.dot`` steps with fp32
accumulation, softcapped in registers and folded into an online (max, sum exp). Per (token, split) the program
writes four partials: max, sum of exp(z - max), the target logit (only the split holding the target has it: the
same fp32 value the sum saw) and the sum of logits (label smoothing). The launcher merges the partials of the
splits in a fixed order (deterministic; ``merge_partials``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import _grouped_tile, _logits_tile


@triton.jit
def _lce_forward_kernel(h_ptr, w_ptr, b_ptr, slot_token_ptr, slot_row_ptr, slot_target_ptr, n_valid_ptr,
                        part_ptr, N, V, D, stride_h, stride_w, tiles_per_split, n_splits, softcap,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr):
    pid_n, split = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP_N)
    n_valid = tl.load(n_valid_ptr)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    if pid_n * BLOCK_N < n_valid:
        rows = tl.load(slot_row_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
        target = tl.load(slot_target_ptr + offs_n, mask=row_mask, other=0)
        row_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
        target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
        logit_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < v_end
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w,
                                       softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V,
                                       BLOCK_D)
            target_logit += tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), axis=1)
            if HAS_SMOOTHING:
                logit_sum += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
            z = tl.where(v_mask[None, :], z, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(z, axis=1))
            sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            row_max = new_max
        token = tl.load(slot_token_ptr + offs_n, mask=row_mask, other=0)
        out = part_ptr + split * N + token
        plane = n_splits * N
        tl.store(out, row_max, mask=row_mask)
        tl.store(out + plane, sum_exp, mask=row_mask)
        tl.store(out + 2 * plane, target_logit, mask=row_mask)
        if HAS_SMOOTHING:
            tl.store(out + 3 * plane, logit_sum, mask=row_mask)


def merge_partials(part: torch.Tensor, valid: torch.Tensor, vocab: int, label_smoothing: float, z_loss: float):
    """Per-token loss [N] and statistics [2, N] (row max, log sum exp(z - max)) from the splits' partials
    [4, S, N]; in a fixed order, so the result does not depend on scheduling. 0 at ignored tokens."""
    part_max, part_sum, part_target, part_logits = part.unbind(0)
    row_max = part_max.max(0).values
    row_max = torch.where(valid, row_max, torch.zeros_like(row_max))
    sum_exp = (part_sum * torch.exp(part_max - row_max)).sum(0)
    log_sum = torch.log(torch.where(valid, sum_exp, torch.ones_like(sum_exp)))
    lse = row_max + log_sum
    # lse - (1 - eps) z_t - eps mean(z), arranged so that no two large numbers cancel when p_t ~ 1
    loss = log_sum + (1.0 - label_smoothing) * (row_max - part_target.sum(0)) + z_loss * lse * lse
    if label_smoothing:
        loss = loss + label_smoothing * (row_max - part_logits.sum(0) / vocab)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, torch.stack([row_max, log_sum])
