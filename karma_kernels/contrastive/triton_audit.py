"""The contrastive op's launch plans for the sm_90 kernel audit (``python -m bench.kernel_audit --op contrastive``).

Built from ``triton_configs.forward_launches`` / ``backward_launches``, the functions the launchers call, so the
audit compiles exactly what runs. F = 2·B·M·D (one pass of logits); budgets: forward + backward <= 4F with the
atomic backward (1F forward + 3F) and <= 5F with the deterministic one (1F + 4F), the symmetric mode included
(its row and column statistics come from one pass over the tiles). With D > 256 the backward splits D into S
slices that each recompute the logits: budget + (S - 1)F atomic, + 2(S - 1)F deterministic. float32 inputs take
the deterministic schedule (5F at D <= 256); their "split_f16" kernels read float16 (hi, lo) parts of q and k and
run three tensor-core products per dot: the work is counted per dot product of the op (F), not per product.
"""
from __future__ import annotations

from typing import List

import torch
import triton

from .._audit import TRITON_ELEMENT, AuditPlan, KernelLaunch, signature_for
from .triton_configs import backward_launches, resident_limit, d_tiling, forward_launches

_TENSOR_ARGS = ("q_ptr", "k_ptr", "dq_ptr", "dk_ptr")


def audit_plan(batch: int, dim: int, dtype: torch.dtype, mode: str = "softmax", symmetric: bool = False,
               deterministic: bool = False, with_ids_logq: bool = False, logq_grad: bool = False) -> AuditPlan:
    """Forward + backward launches of one call at B = M = ``batch``, default configs (``with_ids_logq``: false
    negatives masked by key_ids and a logq correction; ``logq_grad``: logq requires grad)."""
    element = TRITON_ELEMENT[str(dtype).replace("torch.", "")]
    pointers = {name: "*" + element for name in _TENSOR_ARGS}
    pointers.update(target_ptr="*i64", key_ids_ptr="*i32")   # the launchers pass int32 key ids
    pairwise = mode == "pairwise"
    launches = forward_launches(batch, batch, dim, dtype, pairwise, symmetric, with_ids_logq, with_ids_logq)
    launches += backward_launches(batch, batch, dim, dtype, pairwise, symmetric, with_ids_logq, with_ids_logq,
                                  logq_grad, deterministic)
    audited = []
    for launch in launches:
        # B, M, D and the row strides are multiples of 16 at the audited shapes: the runtime specialises them so
        aligned = ("B", "M", "D", "stride_q", "stride_k") if dim % 16 == 0 and batch % 16 == 0 else ()
        operands = {}
        if launch.constexprs["DOT"] == "split_f16":    # float16 parts, rows of 2·P with P a multiple of 8
            operands = {"q_ptr": "*fp16", "k_ptr": "*fp16"}
            aligned = tuple(sorted(set(aligned) | {"stride_q", "stride_k"}))
        audited.append(KernelLaunch(
            name=launch.name, kernel=launch.kernel, constexprs=launch.constexprs,
            signature=signature_for(launch.kernel, launch.constexprs, {**pointers, **operands}),
            num_warps=launch.config.num_warps, num_stages=launch.config.num_stages, grid=launch.grid,
            matmul_flops=launch.matmul_flops, phase=launch.phase, divisible_by_16=aligned))
    unit = 2.0 * batch * batch * dim
    tiling = d_tiling(dim, resident_limit(dtype))
    deterministic = not any(launch.constexprs.get("ATOMIC_DQ") for launch in launches)   # the schedule chosen
    budget = 5.0 if deterministic else 4.0
    if not tiling["RESIDENT"]:    # each of the S output slices of the gradient kernels recomputes the logits
        budget += (2.0 if deterministic else 1.0) * (triton.cdiv(dim, tiling["BLOCK_DV"]) - 1)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    case = (f"B=M={batch} D={dim} {name} {mode}{' symmetric' if symmetric else ''}"
            f"{' key_ids+logq' if with_ids_logq else ''}{' logq_grad' if logq_grad else ''} "
            f"{'deterministic' if deterministic else 'atomic dq'}")
    return AuditPlan("contrastive", case, unit, budget, tuple(audited))


def audit_plans(quick: bool = False) -> List[AuditPlan]:
    """The CI set (benchmark shape B = M = 65536, D = 256) and, unless ``quick``, more shapes and options."""
    big = 65536
    plans = [audit_plan(big, 256, torch.bfloat16, mode, symmetric, deterministic)
             for mode, symmetric in (("softmax", False), ("pairwise", False), ("softmax", True))
             for deterministic in (False, True)]
    plans += [audit_plan(big, 256, torch.float16), audit_plan(big, 256, torch.float32),
              audit_plan(big, 256, torch.bfloat16, with_ids_logq=True)]   # the masks and logq of KARMA training
    if not quick:
        plans += [audit_plan(big, 256, torch.bfloat16, with_ids_logq=True, logq_grad=True),
                  audit_plan(big, 256, torch.float16, "pairwise"),
                  audit_plan(big, 256, torch.float32, "pairwise"),
                  audit_plan(big, 256, torch.float32, symmetric=True),
                  audit_plan(big, 256, torch.float32, with_ids_logq=True, logq_grad=True),
                  audit_plan(16384, 128, torch.bfloat16),
                  audit_plan(16384, 64, torch.bfloat16, "pairwise"),
                  audit_plan(16384, 128, torch.float32, symmetric=True, with_ids_logq=True, logq_grad=True),
                  audit_plan(16384, 64, torch.float32, "pairwise"),
                  audit_plan(16384, 512, torch.bfloat16),
                  audit_plan(16384, 512, torch.bfloat16, deterministic=True)]
        from .triton_sigmoid import audit_plan as sigmoid_audit_plan  # the sigmoid mode's own kernels
        plans += [sigmoid_audit_plan(16384, 256, torch.bfloat16), sigmoid_audit_plan(16384, 128, torch.float32)]
    return plans
