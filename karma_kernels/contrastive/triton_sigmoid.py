"""Triton kernels of ``contrastive_loss(mode="sigmoid")`` (SigLIP; math in ``reference.py``), launched from
``triton_impl`` when the mode is "sigmoid".

The op folds the sigmoid bias into ``logq`` (s_ij + b = q_i.k_j / T - (logq_j - b)), so these kernels see logits
s_ij = q_i.k_j / T - logq_j and the bias gradient is -sum_j dlogq_j. With label z = +1 on the target and -1
elsewhere, over valid pairs (``key_ids`` masks false negatives as in the other modes)::

    loss_i = sum_j softplus(-z_ij s_ij)         G_ij = d loss_i / d s_ij = sigmoid(s_ij) - [j == target_i]

Two kernels, each a plain tiled loop with the whole feature dimension resident (BLOCK_D = next power of two of D,
D <= ``MAX_D``), no atomics (deterministic):
  rows  one program per block of query rows: the forward (per-row loss, stats[0] = the target logit) or, with
        DQ=True, dq_i = sum_j c_i G_ij k_j / T.
  dk    one program per block of keys: dk_j = sum_i c_i G_ij q_i / T and dlogq_j = -sum_i c_i G_ij.
dT = -(1/T) sum_i q_i . dq_i (the identity in ``torch_impl``). Loads are upcast to float32 and the dots run in
float32 with ``input_precision="ieee"`` (no TF32 rounding): accuracy first, this mode has no tuned schedule.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .torch_impl import STATS_ROWS

MAX_D = 512  # the resident feature block; larger D runs on the torch path
BLOCK_ROWS = 16
BLOCK_KEYS = 32


def sigmoid_rejects(dim: int) -> Optional[str]:
    if dim > MAX_D:
        return f"the sigmoid-mode Triton kernels hold D <= {MAX_D} features per tile, got D = {dim}"
    return None


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow; log1p by its series where 1 + e rounds."""
    e = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _tile(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, inv_t, rows, cols, dims, B, M, D, stride_q, stride_k,
          HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr):
    """Logits s [rows, cols], valid pairs, the target mask, and the float32 query / key tiles."""
    row_ok = rows < B
    col_ok = cols < M
    dim_ok = dims < D
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_q + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    k = tl.load(k_ptr + cols.to(tl.int64)[:, None] * stride_k + dims[None, :],
                mask=col_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * inv_t
    if HAS_LOGQ:
        s -= tl.load(logq_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    is_target = cols[None, :] == target[:, None]
    valid = row_ok[:, None] & col_ok[None, :]
    if HAS_KEY_IDS:
        positive_id = tl.load(key_ids_ptr + target, mask=row_ok, other=0)
        key_id = tl.load(key_ids_ptr + cols, mask=col_ok, other=0)
        valid = valid & ((key_id[None, :] != positive_id[:, None]) | is_target)
    return s, valid, is_target, q, k


@triton.jit
def _grad(s, valid, is_target, coef):
    """c_i G_ij: sigmoid(s) off the target, -sigmoid(-s) on it (no cancellation), 0 where invalid."""
    g = tl.where(is_target, -_sigmoid(-s), _sigmoid(s))
    return tl.where(valid, g * coef[:, None], 0.0)


@triton.jit
def _row_kernel(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, temperature_ptr, coef_ptr, out_ptr, stats_ptr,
                B, M, D, stride_q, stride_k, HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr, DQ: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of query rows against every key. DQ=False (forward): loss -> out_ptr [B], target logit ->
    stats_ptr [B]. DQ=True: dq -> out_ptr [B, D] for the upstream coefficients coef_ptr [B]."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    dims = tl.arange(0, BLOCK_D)
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    loss = tl.zeros((BLOCK_B,), dtype=tl.float32)
    positive = tl.zeros((BLOCK_B,), dtype=tl.float32)
    dq = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    if DQ:
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    else:
        coef = loss
    for n0 in range(0, M, BLOCK_M):
        cols = n0 + tl.arange(0, BLOCK_M)
        s, valid, is_target, q, k = _tile(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, inv_t, rows, cols, dims,
                                          B, M, D, stride_q, stride_k, HAS_KEY_IDS, HAS_LOGQ)
        if DQ:
            dq += tl.dot(_grad(s, valid, is_target, coef), k, input_precision="ieee")
        else:
            loss += tl.sum(tl.where(valid, _softplus(tl.where(is_target, -s, s)), 0.0), axis=1)
            positive += tl.sum(tl.where(valid & is_target, s, 0.0), axis=1)
    if DQ:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], dq * inv_t,
                 mask=row_ok[:, None] & (dims < D)[None, :])
    else:
        tl.store(out_ptr + rows, loss, mask=row_ok)
        tl.store(stats_ptr + rows, positive, mask=row_ok)


@triton.jit
def _dk_kernel(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, temperature_ptr, coef_ptr, dk_ptr, dlogq_ptr,
               B, M, D, stride_q, stride_k, HAS_KEY_IDS: tl.constexpr, HAS_LOGQ: tl.constexpr,
               WANT_LOGQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    dk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dlogq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        coef = tl.load(coef_ptr + rows, mask=rows < B, other=0.0)
        s, valid, is_target, q, k = _tile(q_ptr, k_ptr, target_ptr, key_ids_ptr, logq_ptr, inv_t, rows, cols, dims,
                                          B, M, D, stride_q, stride_k, HAS_KEY_IDS, HAS_LOGQ)
        g = _grad(s, valid, is_target, coef)
        dk += tl.dot(tl.trans(g), q, input_precision="ieee")
        dlogq -= tl.sum(g, axis=0)
    col_ok = cols < M
    tl.store(dk_ptr + cols.to(tl.int64)[:, None] * D + dims[None, :], dk * inv_t,
             mask=col_ok[:, None] & (dims < D)[None, :])
    if WANT_LOGQ:
        tl.store(dlogq_ptr + cols, dlogq, mask=col_ok)


def launch_options(block_d: int) -> dict:
    """Warps and stages: from BLOCK_D = 128 on, 4 warps spill the dq / dk accumulators on sm_90 (ptxas), 8 do not
    (2 stages keep the shared memory of BLOCK_D = 512 within the limit)."""
    return dict(num_warps=8, num_stages=2) if block_d >= 128 else dict(num_warps=4, num_stages=3)


def _common(query, keys, target, key_ids, logq):
    query, keys = query.contiguous(), keys.contiguous()
    batch, dim = query.shape
    block_d = max(16, triton.next_power_of_2(dim))
    flags = dict(HAS_KEY_IDS=key_ids is not None, HAS_LOGQ=logq is not None, BLOCK_B=BLOCK_ROWS,
                 BLOCK_M=BLOCK_KEYS, BLOCK_D=block_d, **launch_options(block_d))
    pointers = (query, keys, target, key_ids if key_ids is not None else target,
                logq if logq is not None else query)
    return query, keys, batch, dim, flags, pointers


def sigmoid_forward(query, keys, target, temperature, key_ids, logq) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [B] float32 and stats [STATS_ROWS, B] float32 (row 0 the target logit, the rest 0)."""
    query, keys, batch, dim, flags, pointers = _common(query, keys, target, key_ids, logq)
    loss = torch.empty(batch, dtype=torch.float32, device=query.device)
    stats = torch.zeros(STATS_ROWS, batch, dtype=torch.float32, device=query.device)
    _row_kernel[(triton.cdiv(batch, BLOCK_ROWS),)](*pointers, temperature, loss, loss, stats, batch, keys.shape[0],
                                                   dim, query.stride(0), keys.stride(0), DQ=False, **flags)
    return loss, stats


def sigmoid_backward(row_coef, query, keys, target, temperature, key_ids, logq, want_logq_grad: bool = False):
    """(dq, dk, dtemperature, dlogq or None) of sum_i row_coef_i * loss_i, float32."""
    query, keys, batch, dim, flags, pointers = _common(query, keys, target, key_ids, logq)
    num_keys = keys.shape[0]
    coef = row_coef.to(torch.float32).contiguous()
    dq = torch.empty(batch, dim, dtype=torch.float32, device=query.device)
    dk = torch.empty(num_keys, dim, dtype=torch.float32, device=query.device)
    dlogq = torch.empty(num_keys, dtype=torch.float32, device=query.device) if want_logq_grad else None
    sizes = (batch, num_keys, dim, query.stride(0), keys.stride(0))
    _row_kernel[(triton.cdiv(batch, BLOCK_ROWS),)](*pointers, temperature, coef, dq, coef, *sizes, DQ=True, **flags)
    _dk_kernel[(triton.cdiv(num_keys, BLOCK_KEYS),)](*pointers, temperature, coef, dk,
                                                     dlogq if dlogq is not None else coef, *sizes,
                                                     WANT_LOGQ=want_logq_grad, **flags)
    inv_temperature = 1.0 / temperature.to(torch.float32)
    dtemperature = -(query.to(torch.float32) * dq).sum() * inv_temperature
    return dq, dk, dtemperature, dlogq


def audit_plan(batch: int, dim: int, dtype: torch.dtype):
    """The sm_90 kernel-audit plan of one sigmoid-mode call at B = M = ``batch`` (``triton_audit.audit_plans``).
    float32 "ieee" dots: no tensor cores expected; the forward's operand loads are not pipelined into
    asynchronous copies for half inputs. Work: forward 1F, dq 2F, dk 2F (both backward kernels recompute)."""
    from .._audit import TRITON_ELEMENT, AuditPlan, KernelLaunch, signature_for

    element = "*" + TRITON_ELEMENT[str(dtype).replace("torch.", "")]
    pointers = dict(q_ptr=element, k_ptr=element, target_ptr="*i64", key_ids_ptr="*i64")
    block_d = max(16, triton.next_power_of_2(dim))
    flags = dict(HAS_KEY_IDS=True, HAS_LOGQ=True, BLOCK_B=BLOCK_ROWS, BLOCK_M=BLOCK_KEYS, BLOCK_D=block_d)
    unit = 2.0 * batch * batch * dim
    launches = []
    for name, kernel, extra, grid_rows, work, phase in (
            ("sigmoid_forward", _row_kernel, dict(DQ=False), BLOCK_ROWS, 1.0, "forward"),
            ("sigmoid_dq", _row_kernel, dict(DQ=True), BLOCK_ROWS, 2.0, "backward"),
            ("sigmoid_dk", _dk_kernel, dict(WANT_LOGQ=True), BLOCK_KEYS, 2.0, "backward")):
        constexprs = dict(flags, **extra)
        launches.append(KernelLaunch(
            name=name, kernel=kernel, constexprs=constexprs, signature=signature_for(kernel, constexprs, pointers),
            grid=(triton.cdiv(batch, grid_rows),), matmul_flops=work * unit, phase=phase, tensor_cores=False,
            pipelined=dtype == torch.float32 or name != "sigmoid_forward", **launch_options(block_d)))
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return AuditPlan("contrastive", f"B=M={batch} D={dim} {name} sigmoid key_ids+logq", unit, 5.0, tuple(launches))
