"""Argument checks of the linear + cross-entropy ops. Each error names the op, the argument and what was expected."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from .._validation import check_reduction, check_same_device, check_tensor


def as_int(op: str, name: str, value, *, allow_none: bool = False) -> Optional[int]:
    """A Python or numpy integer (torch accepts both) as an int; bools are refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool,)) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Integral):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{op}: {name} must be {expected}, got {value!r}")
    return int(value)


def check_options(op: str, ignore_index, reduction, label_smoothing, z_loss, softcap) -> int:
    """Checks the loss options; returns ``ignore_index`` as a Python int."""
    ignore_index = as_int(op, "ignore_index", ignore_index)
    check_reduction(op, reduction)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not 0.0 <= float(z_loss) < float("inf"):
        raise ValueError(f"{op}: z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not 0.0 < float(softcap) < float("inf")):
        raise ValueError(f"{op}: softcap must be None or a finite float > 0, got {softcap!r}")
    return ignore_index


def check_backward_options(op: str, filter_eps, accum_dtype) -> Optional[str]:
    """Checks the Triton backward options; returns ``accum_dtype`` as None or "fp32" (``torch.float32``, Liger's
    spelling, is accepted)."""
    if accum_dtype is torch.float32:
        accum_dtype = "fp32"
    if filter_eps != "auto" and (isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float))
                                 or not 0.0 <= float(filter_eps) < float("inf")):
        raise ValueError(f"{op}: filter_eps must be \"auto\" or a finite float >= 0, got {filter_eps!r}")
    if accum_dtype not in (None, "fp32"):
        raise ValueError(f"{op}: accum_dtype must be None, \"fp32\" or torch.float32, got {accum_dtype!r}")
    return accum_dtype


def check_flag(op: str, name: str, value) -> bool:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{op}: {name} must be a bool, got {value!r}")
    return bool(value)


def resolve_filter_eps(filter_eps, dtype: torch.dtype) -> float:
    """The "auto" gradient filter: eps(dtype) / 32 for fp16/bf16 (2^-15 and 2^-12), 0 (exact) otherwise. An
    entry below it, times a weight or hidden row, is below 1/32 of that row's rounding step in the gradient."""
    if filter_eps != "auto":
        return float(filter_eps)
    return torch.finfo(dtype).eps / 32 if dtype in (torch.float16, torch.bfloat16) else 0.0


def check_head(op: str, hidden, weight, bias) -> None:
    check_tensor(op, "hidden", hidden, floating=True)
    check_tensor(op, "weight", weight, ndim=2, floating=True)
    if hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must have shape [..., D], got a 0-d tensor")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got weight shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight must have at least one row (V >= 1), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    check_same_device(op, hidden=hidden, weight=weight, bias=bias)


def check_class_weight(op: str, ce_weight, vocab: int, hidden: torch.Tensor, label_smoothing) -> None:
    """``ce_weight``: a floating [V] tensor of class weights (torch's ``weight=``) on hidden's device."""
    if ce_weight is None:
        return
    check_tensor(op, "ce_weight", ce_weight, ndim=1, floating=True)
    if ce_weight.shape[0] != vocab:
        raise ValueError(f"{op}: ce_weight must have shape [V] = [{vocab}], got {tuple(ce_weight.shape)}")
    check_same_device(op, hidden=hidden, ce_weight=ce_weight)
    if label_smoothing:
        raise ValueError(f"{op}: ce_weight with label_smoothing > 0 is not supported (torch weighs every "
                         "smoothed class term, which needs the full logits); use one or the other")


def check_target_values(op: str, name: str, target: torch.Tensor, vocab: int, ignored: Optional[int]) -> None:
    """Range check of the class indices. On CPU (outside compiled graphs) it raises ValueError at once; on a GPU
    reading values would sync the host, so a device-side assertion fails the stream instead (no silent
    out-of-range target that never matches a class). Meta tensors hold no values: nothing to check."""
    if target.numel() == 0 or target.device.type == "meta":
        return
    if target.device.type != "cpu":
        in_range = (target >= 0) & (target < vocab)
        if ignored is not None:
            in_range |= target == ignored
        torch._assert_async(in_range.all(), f"{op}: {name} values must be in [0, {vocab})")
        return
    if torch.compiler.is_compiling():
        return
    real = target if ignored is None else target[target != ignored]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        bad = real[(real < 0) | (real >= vocab)][0]
        allowed = f" or ignore_index={ignored}" if ignored is not None else ""
        raise ValueError(f"{op}: {name} values must be in [0, {vocab}){allowed}; found {int(bad)}")
