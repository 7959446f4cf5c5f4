"""What a Triton op tells the kernel audit (``python -m bench.kernel_audit``) about its GPU launches.

Each op's ``triton_impl.audit_plan(...)`` returns an :class:`AuditPlan`: the kernels its launchers would start
for a problem shape and dtype, with the exact signature, compile-time constants, warps, stages and grid, and the
matmul work every launch does, counted from its grid and tile loops (2·m·n·k per ``tl.dot``, summed over the
whole grid). The audit compiles each launch for sm_90 without a GPU, reads registers, spills, shared memory and
the instructions in the PTX, and compares the total work with the op's minimum.

The plan must be built by the same code that picks the launchers' configs and grids, so that what is audited is
what runs. Nothing here imports Triton or queries a device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

# Triton signature type of a tensor's element dtype, by torch dtype name.
TRITON_ELEMENT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch of an op: what is compiled, how often it runs and how much matmul work it does."""

    name: str                       # e.g. "forward", "grad_query"
    kernel: Any                     # the @triton.jit function
    signature: Dict[str, str]       # every argument: Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: Dict[str, Any]      # values of the "constexpr" arguments
    num_warps: int
    num_stages: int
    grid: Tuple[int, ...]
    matmul_flops: float             # 2·m·n·k per tl.dot, summed over the whole grid
    pipelined: bool = True          # has a main loop whose operand loads should be asynchronous copies
    tensor_cores: bool = True       # its dots should run as wgmma (half-precision operands, or tf32)
    phase: str = "forward"          # "forward" or "backward": work is reported per phase
    # integer arguments (sizes, strides) that are multiples of 16 at this shape: Triton's JIT specialises on
    # that, and on every tensor pointer being 16-byte aligned (vectorised, asynchronous loads need it), so the
    # audit compiles with the same hints (pointers are always marked; listing one here is harmless)
    divisible_by_16: Tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditPlan:
    """The launches of one op's forward + backward at one shape, and the op's minimal matmul work F."""

    op: str
    case: str                       # readable shape/dtype/options, e.g. "B=M=65536 D=256 bf16 softmax"
    unit_flops: float               # F: the op's minimal matmul work of one pass (e.g. 2·B·M·D)
    work_budget: float              # forward + backward work allowed, in units of F
    launches: Tuple[KernelLaunch, ...] = field(default_factory=tuple)

    def work(self, phase: str = "") -> float:
        """Matmul work of the plan (of one phase when given), in units of F."""
        return sum(l.matmul_flops for l in self.launches if not phase or l.phase == phase) / self.unit_flops


def signature_for(kernel, constexprs: Dict[str, Any], pointer_types: Dict[str, str],
                  float_args: Tuple[str, ...] = (), default_pointer: str = "*fp32",
                  default_scalar: str = "i32") -> Dict[str, str]:
    """A Triton signature for ``kernel``: constexpr for the given constants, the named pointer types, fp32 for the
    named float scalars, ``default_pointer`` for any other ``*_ptr`` argument and ``default_scalar`` otherwise."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        elif name.endswith("_ptr"):
            signature[name] = default_pointer
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = default_scalar
    return signature
