"""Autocast support for the public ops.

Under ``torch.autocast`` a model hands the ops mixed dtypes (bf16 hidden states, an fp32 LM-head weight). Like
``F.linear`` there, the ops cast their floating matrix inputs to the autocast dtype; the op itself then runs with
autocast off, so its own fp32 accumulation is not cast down again. Scalars and per-key vectors (temperature,
logq) keep their dtype.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch


def autocast_inputs(*names: str) -> Callable:
    """Decorate a public op: under autocast, cast the floating tensor arguments ``names`` to the autocast dtype
    (float64 tensors are left alone, as autocast does) and run the op with autocast disabled."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = args[0] if args else None
            if not isinstance(first, torch.Tensor):
                return fn(*args, **kwargs)
            device_type = first.device.type
            # meta (shape inference) and other devices without autocast: nothing to cast
            if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            dtype = torch.get_autocast_dtype(device_type)
            bound = signature.bind(*args, **kwargs)
            for name in names:
                value = bound.arguments.get(name)
                if (isinstance(value, torch.Tensor) and value.is_floating_point()
                        and value.dtype != torch.float64):
                    bound.arguments[name] = value.to(dtype)
            with torch.autocast(device_type, enabled=False):
                return fn(*bound.args, **bound.kwargs)

        return wrapper

    return decorate
