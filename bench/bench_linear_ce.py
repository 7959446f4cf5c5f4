"""linear_cross_entropy, forward + backward: reference vs torch 2.13's chunked op vs our paths vs peers.

impls:
  reference     karma_kernels' oracle (F.linear + F.cross_entropy, materialises the N x V logits in fp32)
  torch_eager   what users write: ``F.cross_entropy(F.linear(h, W).float(), t)`` (logits in the input dtype;
                the baseline of the GPU ratios)
  torch_native  torch 2.13's chunked ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  torch         our chunked path (what CPU users get)
  triton        our Triton kernels (CUDA only)
  liger         Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA only, where installed)
  cce           Apple's Cut Cross-Entropy ``linear_cross_entropy`` with its defaults (gradient filtering on; CUDA
                only, where installed)

Targets (read off the report, never asserted): CPU N=4096, D=512, V=32000, fp32: torch <= 0.9x torch_native's
time at <= its peak memory. GPU N=8192, D=2304, V=256000, bf16: triton at least cce's speed at no more than its
memory. On a GPU the cases run ours first, then torch_eager and the peers, then the slow ones. ``flops``
counts the three N x D x V matmuls of a forward + backward (6 N D V).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench._baselines import LINEAR_CE_SHAPES, eager_linear_ce
from bench.conftest import DEVICE, GPU_ONLY, GPU_ONLY_SKIP, HAS_CUDA, QUICK, dtype_name, import_peer, run_case
from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce.reference import linear_cross_entropy_reference

GPU_ONLY_IMPLS = ("triton", "liger", "cce")
# GPU order: ours first, then the eager bf16 baseline and the peers; the slow chunked torch path and the fp32
# reference last (and not at all under KARMA_BENCH_GPU_ONLY=1, where the budget goes to the GPU cases)
GPU_IMPLS = ("triton", "torch_eager", "liger", "cce", "torch_native")
SLOW_ON_GPU = ("torch", "reference")
CPU_IMPLS = ("reference", "torch_eager", "torch_native", "torch")

if QUICK and not GPU_ONLY:
    CASES = [(512, 128, 4000, torch.float32)]
elif HAS_CUDA or GPU_ONLY:
    # the peers' own shapes: CCE's (Gemma 2, N=8192 D=2304 V=256000) and Liger's (Llama 3, D=4096 V=128256)
    CASES = [(*shape, torch.bfloat16) for shape in LINEAR_CE_SHAPES]
    if not GPU_ONLY:
        CASES.append((4096, 512, 32000, torch.float32))
else:
    CASES = [(4096, 512, 32000, torch.float32)]


def _params():
    on_gpu = HAS_CUDA or GPU_ONLY
    impls = (GPU_IMPLS + (() if GPU_ONLY else SLOW_ON_GPU)) if on_gpu else CPU_IMPLS + GPU_ONLY_IMPLS
    return [pytest.param(impl, *case, id=f"{impl}-N{case[0]}-D{case[1]}-V{case[2]}-{dtype_name(case[3])}")
            for case in CASES for impl in impls]


def _loss_fn(impl):
    if impl == "reference":
        return lambda h, w, t: linear_cross_entropy_reference(h, w, t)
    if impl == "torch_eager":  # what users write: the logits in the input dtype, the loss in fp32
        return eager_linear_ce
    if impl == "torch_native":
        if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            pytest.skip("torch.nn.LinearCrossEntropyOptions needs torch >= 2.13")
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=options)
    if impl in ("torch", "triton"):
        return lambda h, w, t: linear_cross_entropy(h, w, t, backend=impl)
    if impl == "liger":
        loss_module = import_peer("liger_kernel.transformers", "liger-kernel").LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, t: loss_module(w, h, t)
    cce = import_peer("cut_cross_entropy", "cut-cross-entropy")
    return lambda h, w, t: cce.linear_cross_entropy(h, w, t)  # its defaults: gradient filtering on


@pytest.mark.parametrize("impl,n,d,v,dtype", _params())
def test_linear_ce_fwd_bwd(benchmark, impl, n, d, v, dtype):
    if GPU_ONLY and not HAS_CUDA:
        pytest.skip(GPU_ONLY_SKIP)
    if impl in GPU_ONLY_IMPLS and not HAS_CUDA:
        pytest.skip(f"{impl} runs on CUDA only (the Triton interpreter is for tests)")
    loss_fn = _loss_fn(impl)
    # drawn on the device: a CPU draw of the V x D weight takes seconds per case at the GPU shapes
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, d, generator=gen, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen, device=DEVICE) / d ** 0.5).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen, device=DEVICE)

    def step():
        hidden.grad = None
        weight.grad = None
        loss = loss_fn(hidden, weight, target)
        loss.backward()
        return loss

    # one warm-up call everywhere: the peak memory is then the steady-state step's, not the first call's
    # (which adds one-time allocations of the math library)
    run_case(benchmark, step, op="linear_ce", impl=impl, shape=f"N={n},D={d},V={v}", dtype=dtype, device=DEVICE,
             flops=6 * n * d * v, warmup_rounds=1, **({"baseline": "torch_eager"} if DEVICE == "cuda" else {}))
