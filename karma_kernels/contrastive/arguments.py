"""Argument checks of ``contrastive_loss``: every error names the op, the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

from .._validation import check_choice, check_reduction, check_same_device, check_tensor

OP = "contrastive_loss"
MODES = ("softmax", "pairwise", "sigmoid")


def check_process_group(process_group) -> None:
    import torch.distributed as dist
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"{OP}: process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}")


def check_scalar(name: str, value, positive: bool) -> None:
    """A python real or a 0-d floating tensor (``positive``: > 0 as well); finite. Tensors are read on the CPU only
    (outside torch.compile): reading a CUDA tensor would sync the host."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{OP}: {name} must be a python float or a 0-d floating tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return
        number = float(value.detach())
        what = "a tensor holding "
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        number, what = float(value), ""
    else:
        raise TypeError(f"{OP}: {name} must be a python float or a 0-d tensor, got {type(value).__name__}")
    if not math.isfinite(number) or (positive and number <= 0):
        raise ValueError(f"{OP}: {name} must be {'> 0 and ' if positive else ''}finite, got {what}{number!r}")


def _check_vector(name: str, value, length: int, letter: str, per: str, **dtype) -> None:
    """An optional 1-D tensor with one entry per query (letter B) or per key (M)."""
    if value is None:
        return
    check_tensor(OP, name, value, ndim=1, **dtype)
    if value.shape[0] != length:
        raise ValueError(f"{OP}: {name} must have {letter}={length} entries (one per {per}), got {value.shape[0]}")


def validate(query, keys, target, temperature, key_ids, logq, mode, symmetric, reduction, sample_weight, bias):
    check_tensor(OP, "query", query, ndim=2, floating=True)
    check_tensor(OP, "keys", keys, ndim=2, floating=True)
    batch, dim = query.shape
    num_keys = keys.shape[0]
    if batch == 0 or dim == 0:
        raise ValueError(f"{OP}: query must be non-empty [B, D], got shape {tuple(query.shape)}")
    if num_keys == 0:
        raise ValueError(f"{OP}: keys must hold at least one key, got shape {tuple(keys.shape)}")
    if keys.shape[1] != dim:
        raise ValueError(f"{OP}: keys must be [M, D] with the query's D={dim}, got shape {tuple(keys.shape)}")
    if keys.dtype != query.dtype:
        raise TypeError(f"{OP}: keys must have the query's dtype {query.dtype}, got {keys.dtype}")
    check_choice(OP, "mode", mode, MODES)
    check_reduction(OP, reduction)
    if not isinstance(symmetric, bool):
        raise TypeError(f"{OP}: symmetric must be a bool, got {type(symmetric).__name__}")
    check_scalar("temperature", temperature, positive=True)
    if bias is not None:
        if mode != "sigmoid":
            raise ValueError(f"{OP}: bias is the sigmoid mode's logit bias; it needs mode='sigmoid', got "
                             f"mode={mode!r}")
        check_scalar("bias", bias, positive=False)
    _check_vector("sample_weight", sample_weight, batch, "B", "query", floating=True)
    _check_vector("target", target, batch, "B", "query", integer=True)
    if target is None and num_keys < batch:
        raise ValueError(f"{OP}: target=None means target = arange(B), which needs M >= B keys; got B={batch}, "
                         f"M={num_keys} (pass target to pick the positives)")
    _check_vector("key_ids", key_ids, num_keys, "M", "key", integer=True)
    _check_vector("logq", logq, num_keys, "M", "key", floating=True)
    if symmetric:
        if mode != "softmax":
            raise ValueError(f"{OP}: symmetric=True needs mode='softmax', got mode={mode!r}")
        if target is not None:
            raise ValueError(f"{OP}: symmetric=True pairs query i with key i; pass target=None")
        if num_keys < batch:
            raise ValueError(f"{OP}: symmetric=True needs the B positives as the first keys (M >= B; M == B "
                             f"for CLIP, M = 2B with hard negatives), got B={batch}, M={num_keys}")
    device = check_same_device(OP, query=query, keys=keys, target=target, key_ids=key_ids, logq=logq,
                               sample_weight=sample_weight)
    if target is not None and device.type == "cpu" and not torch.compiler.is_compiling():
        # a value check: on CPU it costs no device sync; on GPUs it is left to the kernels' masked loads
        if bool(((target < 0) | (target >= num_keys)).any()):
            raise ValueError(f"{OP}: target values must index keys, in [0, {num_keys}); got min "
                             f"{int(target.min())}, max {int(target.max())}")
    return device
