"""The device ceilings every achieved rate is compared with: one table, per compute dtype, with its source.

Figures are the vendors' datasheet numbers for dense math (no 2:4 sparsity), in FLOP/s, and HBM bytes/s:
  - NVIDIA H200 Tensor Core GPU datasheet (H200 SXM and H200 NVL columns);
  - NVIDIA H100 Tensor Core GPU datasheet (H100 SXM, H100 NVL, H100 PCIe columns);
  - NVIDIA A100 Tensor Core GPU datasheet; NVIDIA L40S datasheet.
Datasheets quote tensor-core rates "with sparsity"; the dense rate, used here, is half of that.

Which ceiling applies is what the kernel's math actually runs on, not the tensor's dtype alone:
  "bfloat16", "float16"  tensor cores, fp32 accumulation (our Triton kernels, cuBLAS, Liger, CCE)
  "tf32"                 tensor cores on fp32 inputs rounded to TF32 (cuBLAS with allow_tf32; Triton's default
                         ``tl.dot`` precision for fp32)
  "float32"              plain IEEE fp32 FMA on the CUDA cores: our fp32 Triton kernels use
                         ``input_precision="ieee"`` and torch's fp32 matmul does too by default
                         (``torch.backends.cuda.matmul.allow_tf32`` is False), so fp32 is compared with this
  "float64"              fp64 tensor-core rate (DMMA)
A measured ceiling (a large bf16 matmul, a device-to-device copy: bench/gpu_probe.py measures both) is the
better yardstick; these are the spec figures the report can always name.
"""
from __future__ import annotations

from typing import Optional

import torch

# name fragment of torch.cuda.get_device_name() -> ceilings; the first fragment contained in the name wins, so
# more specific names come first
DEVICE_CEILINGS = [
    ("H200 NVL", {"bfloat16": 835e12, "float16": 835e12, "tf32": 418e12, "float32": 60e12, "float64": 60e12,
                  "bytes_per_s": 4.8e12}),
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12, "float64": 67e12,
              "bytes_per_s": 4.8e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "tf32": 378e12, "float32": 51e12, "float64": 51e12,
                   "bytes_per_s": 2.0e12}),
    ("H100 NVL", {"bfloat16": 835e12, "float16": 835e12, "tf32": 418e12, "float32": 60e12, "float64": 60e12,
                  "bytes_per_s": 3.9e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12, "float64": 67e12,
              "bytes_per_s": 3.35e12}),
    ("A100-SXM4-40GB", {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12,
                        "float64": 19.5e12, "bytes_per_s": 1.555e12}),
    ("A100 80GB PCIe", {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12,
                        "float64": 19.5e12, "bytes_per_s": 1.935e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12, "float64": 19.5e12,
              "bytes_per_s": 2.039e12}),
    ("L40S", {"bfloat16": 362e12, "float16": 362e12, "tf32": 183e12, "float32": 91.6e12, "float64": 1.4e12,
              "bytes_per_s": 0.864e12}),
]
SOURCE = "vendor datasheet, dense (bench/_ceilings.py)"


def ceilings_for_name(name: str) -> Optional[dict]:
    for fragment, ceilings in DEVICE_CEILINGS:
        if fragment in name:
            return ceilings
    return None


def device_ceilings(device) -> Optional[dict]:
    """Spec-sheet ceilings of ``device``; None on CPU or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return ceilings_for_name(torch.cuda.get_device_name(device))


def flop_ceiling(ceilings: Optional[dict], dtype: str, math: Optional[str] = None) -> Optional[float]:
    """FLOP/s ceiling for work on ``dtype`` inputs; ``math`` ("tf32", ...) overrides the key when the kernel's
    arithmetic is not the dtype's default (see the module docstring)."""
    if not ceilings:
        return None
    return ceilings.get(math or dtype)
