"""The one tolerance table.

Rule (per dtype): err(kernel, truth) <= K[dtype] * err(torch in the same dtype, truth) + EPS[dtype],
where truth is the reference evaluated in float64 on the same inputs, and err is the max absolute difference
scaled by the truth's max magnitude (so one EPS serves losses and gradients of any scale).
"""
from __future__ import annotations

import torch

# multiple of torch's own error in the same dtype that a kernel may reach
K = {torch.float64: 2.0, torch.float32: 4.0, torch.float16: 4.0, torch.bfloat16: 4.0}
# absolute floor (relative to the truth's magnitude) for cases where torch's own error is ~0
EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    x = x.detach().to(torch.float64).cpu()
    truth = truth.detach().to(torch.float64).cpu()
    if x.shape != truth.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != truth shape {tuple(truth.shape)}")
    if truth.numel() == 0:
        return 0.0
    scale = truth.abs().max().clamp_min(1e-30)
    return float((x - truth).abs().max() / scale) if torch.isfinite(x).all() else float("inf")


def assert_close_to_truth(name: str, out: torch.Tensor, truth: torch.Tensor, torch_same_dtype: torch.Tensor,
                          dtype: torch.dtype) -> None:
    """Fail unless ``out`` is within the table's bound of ``truth`` (see module docstring)."""
    err = rel_err(out, truth)
    baseline = rel_err(torch_same_dtype, truth)
    bound = K[dtype] * baseline + EPS[dtype]
    assert err <= bound, (f"{name}: error {err:.3e} vs truth exceeds {K[dtype]} x torch's {dtype} error "
                          f"{baseline:.3e} + {EPS[dtype]:.1e} = {bound:.3e}")
