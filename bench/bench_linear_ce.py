"""linear_cross_entropy, forward + backward: reference vs torch 2.13's chunked op vs our paths vs peers.

impls:
  reference     karma_kernels' oracle (F.linear + F.cross_entropy, materialises the N x V logits in fp32)
  torch_native  torch 2.13's chunked ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  torch         our chunked path (what CPU users get)
  triton        our Triton kernels (CUDA only)
  liger         Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA only, where installed)
  cce           Apple's Cut Cross-Entropy ``linear_cross_entropy`` (CUDA only, where installed)

Targets (read off the report, never asserted): CPU N=4096, D=512, V=32000, fp32: torch <= 0.9x torch_native's
time at <= its peak memory. GPU N=8192, D=2304, V=256000, bf16: triton at least cce's speed at no more than its
memory. ``flops`` counts the three N x D x V matmuls of a forward + backward (6 N D V).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import DEVICE, HAS_CUDA, QUICK, run_case
from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce.reference import linear_cross_entropy_reference

IMPLS = ("reference", "torch_native", "torch", "triton", "liger", "cce")
GPU_ONLY = ("triton", "liger", "cce")

if QUICK:
    CASES = [(512, 128, 4000, torch.float32)]
elif HAS_CUDA:
    CASES = [(8192, 2304, 256000, torch.bfloat16), (4096, 512, 32000, torch.float32)]
else:
    CASES = [(4096, 512, 32000, torch.float32)]


def _loss_fn(impl):
    if impl == "reference":
        return lambda h, w, t: linear_cross_entropy_reference(h, w, t)
    if impl == "torch_native":
        if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            pytest.skip("torch.nn.LinearCrossEntropyOptions needs torch >= 2.13")
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=options)
    if impl in ("torch", "triton"):
        return lambda h, w, t: linear_cross_entropy(h, w, t, backend=impl)
    if impl == "liger":
        liger = pytest.importorskip("liger_kernel.transformers",
                                    reason="Liger-Kernel is not installed (pip install liger-kernel)")
        loss_module = liger.LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, t: loss_module(w, h, t)
    cce = pytest.importorskip("cut_cross_entropy",
                              reason="Cut Cross-Entropy is not installed (pip install cut-cross-entropy)")
    return lambda h, w, t: cce.linear_cross_entropy(h, w, t)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,v,dtype", CASES,
                         ids=[f"N{n}-D{d}-V{v}-{str(t).replace('torch.', '')}" for n, d, v, t in CASES])
def test_linear_ce_fwd_bwd(benchmark, impl, n, d, v, dtype):
    if impl in GPU_ONLY and not HAS_CUDA:
        pytest.skip(f"{impl} runs on CUDA only (the Triton interpreter is for tests)")
    loss_fn = _loss_fn(impl)
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5).to(device=DEVICE, dtype=dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen).to(DEVICE)

    def step():
        hidden.grad = None
        weight.grad = None
        loss = loss_fn(hidden, weight, target)
        loss.backward()
        return loss

    # one warm-up call everywhere: the peak memory is then the steady-state step's, not the first call's
    # (which adds one-time allocations of the math library)
    run_case(benchmark, step, op="linear_ce", impl=impl, shape=f"N={n},D={d},V={v}", dtype=dtype, device=DEVICE,
             flops=6 * n * d * v, warmup_rounds=1)
