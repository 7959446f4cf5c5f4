"""contrastive_loss, forward + backward: reference vs plain torch vs our torch path vs Triton vs Inf-CL.

impls:
  reference     karma_kernels' oracle (materialises the B x M logits, float32 math)
  torch_eager   what users write today: F.cross_entropy((q @ k.T).float() / T, arange(B)), the logits in the
                input dtype (symmetric: both directions; pairwise: softplus over the materialised logit
                differences); the baseline of the GPU ratios
  torch         our chunked path (CPU users' path; never holds B x M)
  triton        our Triton kernels (CUDA only)
  inf_cl        Inf-CL's single-GPU tiled loss, ``cal_flash_loss`` (CUDA only, softmax one direction, where
                installed)

Targets (read off the report, never asserted): CPU B=16384, D=256, fp32: torch <= 0.9x reference time at
<= 1/5 of its peak memory. GPU B=65536, D=256, bf16: triton >= 2x the reference's speed at <= 1/50 of its memory.
On a GPU, ours run first, then torch_eager and Inf-CL (Inf-CL's own shape, B=65536 D=256), then the reference;
KARMA_BENCH_GPU_ONLY=1 keeps only that headline case and drops the reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench._baselines import CONTRASTIVE_SHAPE, TEMPERATURE, eager_contrastive
from bench.conftest import DEVICE, GPU_ONLY, GPU_ONLY_SKIP, HAS_CUDA, QUICK, dtype_name, import_peer, run_case
from karma_kernels import contrastive_loss
from karma_kernels.contrastive.reference import contrastive_loss_reference

MODES = ("softmax", "symmetric", "pairwise")
CUDA_ONLY_IMPLS = ("triton", "inf_cl")

if QUICK and not GPU_ONLY:
    CASES = [(512, 64, torch.float32, mode) for mode in MODES]
elif GPU_ONLY:
    CASES = [(*CONTRASTIVE_SHAPE, torch.bfloat16, "softmax")]
elif HAS_CUDA:
    CASES = ([(*CONTRASTIVE_SHAPE, torch.bfloat16, "softmax"), (16384, 256, torch.bfloat16, "softmax")]
             + [(16384, 256, torch.bfloat16, mode) for mode in ("symmetric", "pairwise")])
else:
    CASES = [(16384, 256, torch.float32, "softmax")] + [(4096, 256, torch.float32, m)
                                                         for m in ("symmetric", "pairwise")]


def _params():
    if HAS_CUDA or GPU_ONLY:
        impls = ("triton", "torch_eager", "inf_cl") + (() if GPU_ONLY else ("torch", "reference"))
    else:
        impls = ("reference", "torch_eager", "torch", "triton", "inf_cl")
    return [pytest.param(impl, *case, id=f"{impl}-B{case[0]}-D{case[1]}-{dtype_name(case[2])}-{case[3]}")
            for case in CASES for impl in impls]


def _loss_fn(impl, mode, dim):
    symmetric = mode == "symmetric"
    loss_mode = "pairwise" if mode == "pairwise" else "softmax"
    if impl == "reference":
        return lambda q, k: contrastive_loss_reference(q, k, None, TEMPERATURE, mode=loss_mode, symmetric=symmetric)
    if impl == "torch_eager":
        return lambda q, k: eager_contrastive(q, k, mode)
    if impl in ("torch", "triton"):
        return lambda q, k: contrastive_loss(q, k, temperature=TEMPERATURE, mode=loss_mode, symmetric=symmetric,
                                             backend=impl)
    inf_cl = import_peer("inf_cl", "inf-cl")
    if mode != "softmax":
        pytest.skip("Inf-CL computes one softmax direction only")
    if dim not in (16, 32, 64, 128, 256):
        pytest.skip(f"Inf-CL's head_dim must be 16, 32, 64, 128 or 256, not D={dim}")
    # one GPU: Inf-CL's tiled single-device loss (cal_inf_loss is its ring over a process group; with a learnable
    # scale it all-reduces the scale's gradient, which needs torch.distributed set up)
    return lambda q, k: inf_cl.cal_flash_loss(q, k, scale=1.0 / TEMPERATURE, head_dim=dim).mean()


@pytest.mark.parametrize("impl,batch,dim,dtype,mode", _params())
def test_contrastive_fwd_bwd(benchmark, impl, batch, dim, dtype, mode):
    if GPU_ONLY and not HAS_CUDA:
        pytest.skip(GPU_ONLY_SKIP)
    if impl in CUDA_ONLY_IMPLS and not HAS_CUDA:
        pytest.skip(f"{impl} runs on CUDA only (the Triton interpreter is for tests)")
    loss_fn = _loss_fn(impl, mode, dim)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    query = F.normalize(torch.randn(batch, dim, generator=gen, device=DEVICE), dim=1).to(dtype)
    keys = F.normalize(torch.randn(batch, dim, generator=gen, device=DEVICE), dim=1).to(dtype)
    query.requires_grad_()
    keys.requires_grad_()

    def step():
        query.grad = keys.grad = None
        loss = loss_fn(query, keys)
        loss.backward()
        return loss

    # fwd: 2BMD; bwd: 4BMD (dq, dk); the pairwise/softmax elementwise work is not counted
    run_case(benchmark, step, op="contrastive", impl=impl, shape=f"B={batch},D={dim}", dtype=dtype, device=DEVICE,
             flops=6.0 * batch * batch * dim, warmup_rounds=1, mode=mode,
             baseline="torch_eager" if DEVICE == "cuda" else "reference")
