"""The sigmoid-mode Triton kernels (contrastive/triton_sigmoid.py) build for sm_90 without spills, within the
shared-memory limit and their 5F work budget (the kernel audit's rules; compiled in a process without
TRITON_INTERPRET, no GPU needed). The other plans of the contrastive op are j11's CI audit."""
import os
import subprocess
import sys

import pytest

from tests.conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import torch
from bench.kernel_audit import compile_launch, violations
from karma_kernels.contrastive.triton_sigmoid import audit_plan
plan = audit_plan(16384, 256, torch.bfloat16)
broken = violations(plan, [compile_launch(launch) for launch in plan.launches])
print("broken:", broken)
raise SystemExit(1 if broken else 0)
"""


def test_sigmoid_kernels_build_for_sm90_within_the_audit_rules():
    if HAS_CUDA:
        pytest.skip("runs on CPU machines (on a GPU the kernels run in the parity tests)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KARMA_AUTOTUNE")}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    if "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("ptxas is not available to build sm_90 binaries")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
