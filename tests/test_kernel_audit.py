"""The kernel audit (bench/kernel_audit.py): its parsers on known text, and its rules on the real sm_90 builds of
every op's default configs at the benchmark shapes (compiled without a GPU, in a process without
TRITON_INTERPRET)."""
import os
import subprocess
import sys

import pytest

from bench import kernel_audit
from karma_kernels._audit import AuditPlan, KernelLaunch

from tests.conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 560 bytes cmem[0]\n")
    assert kernel_audit.parse_ptxas_log(log) == {"registers": 168, "stack_bytes": 16, "spill_bytes": 20}
    with pytest.raises(RuntimeError, match="resource usage"):
        kernel_audit.parse_ptxas_log("nothing here")


def test_scan_ptx():
    ptx = ("cp.async.cg.shared.global [%r1], [%rd2], 16;\n cp.async.commit_group;\n"
           "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};\n"
           "cp.async.bulk.tensor.2d.shared::cluster.global [%r3], [%rd4, {%r5, %r6}];\n")
    facts = kernel_audit.scan_ptx(ptx)
    assert facts == {"wgmma": 1, "mma_sync": 0, "async_copies": 2, "tma": 1}


def _launch(**kw):
    base = dict(name="k", kernel=None, signature={}, constexprs={}, num_warps=8, num_stages=3, grid=(1,),
                matmul_flops=2.0)
    return KernelLaunch(**{**base, **kw})


def _facts(**kw):
    base = dict(registers=128, spill_bytes=0, stack_bytes=0, shared_bytes=1024, wgmma=4, mma_sync=0,
                async_copies=2, tma=False)
    return kernel_audit.KernelFacts(**{**base, **kw})


def test_rules_flag_each_violation():
    plan = AuditPlan("op", "case", unit_flops=1.0, work_budget=4.0,
                     launches=(_launch(name="fwd", matmul_flops=2.0),
                               _launch(name="bwd", phase="backward", matmul_flops=2.0)))
    assert kernel_audit.violations(plan, [_facts(), _facts()]) == []
    broken = kernel_audit.violations(plan, [_facts(spill_bytes=8, wgmma=0),
                                            _facts(shared_bytes=300 * 1024, async_copies=0)])
    assert len(broken) == 4 and any("spill" in b for b in broken) and any("wgmma" in b for b in broken)
    assert any("shared memory" in b for b in broken) and any("asynchronous" in b for b in broken)
    over = AuditPlan("op", "case", unit_flops=1.0, work_budget=3.0, launches=plan.launches)
    assert any("matmul work 4.00F > budget 3F" in b for b in kernel_audit.violations(over, [_facts(), _facts()]))


def test_audit_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "bench.kernel_audit", "--quick"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "TRITON_INTERPRET" in result.stderr


@pytest.mark.parametrize("op", sorted(kernel_audit.OPS))
def test_default_configs_pass_the_audit(op):
    """Every default config at the benchmark shapes: 0 spills, <= 227 KiB shared memory, wgmma where the dots
    should use tensor cores, async copies in pipelined loops, forward + backward work within the op's budget."""
    if HAS_CUDA:
        pytest.skip("runs on CPU machines (on a GPU the benchmarks measure the kernels directly)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KARMA_AUTOTUNE")}
    result = subprocess.run([sys.executable, "-m", "bench.kernel_audit", "--quick", "--check", "--op", op],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    if "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("ptxas is not available to build sm_90 binaries")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "all rules hold" in result.stdout


def test_float32_contrastive_plan_is_resident_on_tensor_cores_within_5f(monkeypatch):
    """float32 at the benchmark shape (B = M = 65536, D = 256): no D split (one program column per kernel), every
    dot on float16 parts ("split_f16": wgmma, checked with 0 spills by the audit run above, which compiles this
    plan in its CI set) and forward + backward <= 5F, the deterministic budget (7F with the D-sliced FMA gradients
    before). The plan of a GPU process: this one may run under the interpreter."""
    from karma_kernels.contrastive import triton_audit, triton_configs
    import torch

    monkeypatch.setattr(triton_configs, "interpreter_active", lambda: False)

    plan = triton_audit.audit_plan(65536, 256, torch.float32)
    assert plan.case in [p.case for p in triton_audit.audit_plans(quick=True)]
    assert plan.work_budget == 5.0 and plan.work() <= 5.0 + 1e-9
    for launch in plan.launches:
        assert launch.constexprs["DOT"] == "split_f16" and launch.constexprs["RESIDENT"], launch.name
        assert launch.tensor_cores and launch.signature["q_ptr"] == "*fp16", launch.name
        assert len(launch.grid) == 1 or launch.grid[1] == 1, launch.name
        if "GRAD_DOT" in launch.constexprs:
            assert launch.constexprs["GRAD_DOT"] == "split_f16_t", launch.name   # transposed accumulators
