"""Kernel audit: the sm_90 build facts of every Triton kernel, on a machine without a GPU.

    python -m bench.kernel_audit                 # table of every op's plans (benchmark shapes and dtypes)
    python -m bench.kernel_audit --quick --check # the CI set; exit 1 if a default config breaks a rule
    python -m bench.kernel_audit --op contrastive --json audit.json

Each op's ``triton_impl.audit_plans(quick)`` lists its launches at the benchmark shapes (see
``karma_kernels/_audit.py``: kernel, signature, constants, warps, stages, grid, counted matmul work). Every launch is
compiled for sm_90 with Triton's own compiler and bundled ``ptxas`` (no GPU needed), and the audit reports, per
kernel: registers per thread, spill and stack bytes (``ptxas -v``), shared memory (Triton's metadata), warps,
stages, whether the PTX has ``wgmma`` and asynchronous copies (``cp.async`` or TMA bulk copies), and the matmul work
of forward + backward in units of the op's minimum F.

Rules checked with ``--check`` (each default config at the benchmark shapes):
  * 0 spill bytes; shared memory <= 227 KiB (the sm_90 per-block limit);
  * ``wgmma`` in every kernel whose dots should run on tensor cores (``tensor_cores=True``);
  * asynchronous copies in every pipelined kernel (``pipelined=True``);
  * forward + backward matmul work <= the plan's budget (in units of F).
Triton must not run in interpreter mode here: the audit refuses to start under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

SHARED_MEMORY_LIMIT = 227 * 1024     # bytes per block on sm_90 (opt-in maximum)
OPS = {"contrastive": "karma_kernels.contrastive.triton_impl",
       "linear_ce": "karma_kernels.linear_ce.triton_impl"}


@dataclass
class KernelFacts:
    """What the sm_90 build of one launch shows."""

    registers: int
    spill_bytes: int            # spill stores + spill loads
    stack_bytes: int
    shared_bytes: int
    wgmma: int                  # wgmma.mma_async instructions in the PTX
    mma_sync: int               # pre-Hopper mma.sync instructions (tensor cores without wgmma)
    async_copies: int           # cp.async.ca/cg + cp.async.bulk (TMA) copy instructions in the PTX
    tma: bool


_USAGE = re.compile(r"Used (\d+) registers")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> Dict[str, int]:
    """Registers, stack and spill bytes from ``ptxas -v`` output (one kernel)."""
    registers = _USAGE.search(log)
    stack = _STACK.search(log)
    if registers is None or stack is None:
        raise RuntimeError(f"could not read ptxas' resource usage from:\n{log}")
    return {"registers": int(registers.group(1)), "stack_bytes": int(stack.group(1)),
            "spill_bytes": int(stack.group(2)) + int(stack.group(3))}


def scan_ptx(ptx: str) -> Dict[str, int]:
    """Counts of the instructions the rules look for."""
    bulk = len(re.findall(r"\bcp\.async\.bulk", ptx))
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
            "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
            "async_copies": len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)) + bulk,
            "tma": int(bulk > 0)}


def _ptxas_usage(ptx: str, arch: int) -> Dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a",
                                 path, "-o", os.path.join(tmp, "kernel.cubin")],
                                capture_output=True, text=True, check=True)
    return parse_ptxas_log(result.stdout + result.stderr)


def compile_launch(launch, arch: int = 90) -> KernelFacts:
    """Compile one :class:`karma_kernels._audit.KernelLaunch` for ``sm_<arch>`` and read its build facts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = launch.kernel
    while not isinstance(kernel, triton.JITFunction) and hasattr(kernel, "fn"):   # autotuner / heuristics wrap it
        kernel = kernel.fn
    if not isinstance(kernel, triton.JITFunction):
        raise RuntimeError(f"{launch.name}: not a compiled Triton kernel (is TRITON_INTERPRET set?)")
    names = list(kernel.arg_names)
    missing = [n for n in names if n not in launch.signature]
    if missing:
        raise ValueError(f"{launch.name}: the audit signature lacks {missing}")
    constants = {(names.index(k),): v for k, v in launch.constexprs.items()}
    # what the runtime's specialisation tells the compiler: 16-byte aligned tensors, 16-divisible sizes/strides
    # (without it loads are not vectorised and the PTX would not be the one that runs)
    divisible = [n for n in names if launch.signature[n].startswith("*") or n in launch.divisible_by_16]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(kernel, dict(launch.signature), constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    ptx = compiled.asm["ptx"]
    return KernelFacts(shared_bytes=int(compiled.metadata.shared), **_ptxas_usage(ptx, arch), **scan_ptx(ptx))


def _build_key(launch) -> tuple:
    """What determines a launch's binary (its grid and work do not)."""
    return (id(launch.kernel), tuple(sorted(launch.signature.items())),
            tuple(sorted(map(str, launch.constexprs.items()))), launch.num_warps, launch.num_stages,
            tuple(getattr(launch, "aligned", ())))


def violations(plan, facts: Sequence[KernelFacts]) -> List[str]:
    """Every rule a plan's default configs break (empty when the plan passes)."""
    found = []
    for launch, fact in zip(plan.launches, facts):
        where = f"{plan.op} [{plan.case}] {launch.name}"
        if fact.spill_bytes:
            found.append(f"{where}: {fact.spill_bytes} spill bytes")
        if fact.shared_bytes > SHARED_MEMORY_LIMIT:
            found.append(f"{where}: {fact.shared_bytes} B of shared memory > {SHARED_MEMORY_LIMIT}")
        if launch.tensor_cores and not fact.wgmma:
            found.append(f"{where}: no wgmma in the PTX")
        if launch.pipelined and not fact.async_copies:
            found.append(f"{where}: no asynchronous copies (cp.async / TMA) in the PTX")
    if plan.work() > plan.work_budget + 1e-9:
        found.append(f"{plan.op} [{plan.case}]: forward + backward matmul work {plan.work():.2f}F "
                     f"> budget {plan.work_budget:g}F")
    return found


def load_plans(ops: Sequence[str], quick: bool) -> list:
    plans = []
    for op in ops:
        module = importlib.import_module(OPS[op])
        if not hasattr(module, "audit_plans"):
            raise RuntimeError(f"{OPS[op]} has no audit_plans(quick): the audit cannot see its launches")
        plans.extend(module.audit_plans(quick=quick))
    return plans


def _config_text(launch) -> str:
    blocks = {k: v for k, v in launch.constexprs.items() if k.startswith("BLOCK") or k.startswith("GROUP")}
    return " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in blocks.items())


def render(plans, facts_by_plan) -> str:
    lines = []
    for plan, facts in zip(plans, facts_by_plan):
        lines.append(f"\n### {plan.op}: {plan.case}\n")
        lines.append("| kernel | phase | tiles | warps | stages | grid | regs | spill B | stack B | smem KiB "
                     "| wgmma | async copies | work (F) |")
        lines.append("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for launch, fact in zip(plan.launches, facts):
            copies = f"{fact.async_copies}{' (TMA)' if fact.tma else ''}"
            lines.append(f"| {launch.name} | {launch.phase} | {_config_text(launch)} | {launch.num_warps} "
                         f"| {launch.num_stages} | {'×'.join(map(str, launch.grid))} | {fact.registers} "
                         f"| {fact.spill_bytes} | {fact.stack_bytes} | {fact.shared_bytes / 1024:.1f} "
                         f"| {fact.wgmma} | {copies} | {launch.matmul_flops / plan.unit_flops:.2f} |")
        lines.append(f"\nmatmul work: forward {plan.work('forward'):.2f}F + backward {plan.work('backward'):.2f}F "
                     f"= {plan.work():.2f}F (budget {plan.work_budget:g}F; F = {plan.unit_flops:.3g} FLOP)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_audit", description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=sorted(OPS), action="append", help="audit only this op (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the CI set (fewer shapes/dtypes)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a rule is broken")
    parser.add_argument("--json", metavar="PATH", help="also write every kernel's facts as JSON")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the audit compiles real GPU binaries")
    if os.environ.get("KARMA_AUTOTUNE", "0") not in ("", "0"):
        parser.error("unset KARMA_AUTOTUNE: the audit checks the default configs")

    plans = load_plans(args.op or sorted(OPS), args.quick)
    facts_by_plan, records, broken = [], [], []
    built: Dict[tuple, KernelFacts] = {}   # one build per distinct launch (plans share e.g. their forward kernel)
    for plan in plans:
        facts = []
        for launch in plan.launches:
            key = _build_key(launch)
            if key not in built:
                built[key] = compile_launch(launch, args.arch)
            facts.append(built[key])
        facts_by_plan.append(facts)
        broken.extend(violations(plan, facts))
        for launch, fact in zip(plan.launches, facts):
            records.append(dict(op=plan.op, case=plan.case, kernel=launch.name, phase=launch.phase,
                                constexprs={k: v for k, v in launch.constexprs.items()
                                            if isinstance(v, (int, float, bool, str))},
                                num_warps=launch.num_warps, num_stages=launch.num_stages, grid=list(launch.grid),
                                work_f=launch.matmul_flops / plan.unit_flops, **vars(fact)))
    print(render(plans, facts_by_plan))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)
    if broken:
        print("\nRULES BROKEN:\n  " + "\n  ".join(broken))
    else:
        print("\nall rules hold")
    return 1 if (args.check and broken) else 0


if __name__ == "__main__":
    sys.exit(main())
