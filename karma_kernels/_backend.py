"""The one place that decides which implementation of an op runs.

Backends:
  "triton"    fused Triton kernels; on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before
              the kernels were defined (the interpreter is for tests: about 1 ms per program instance).
  "torch"     the memory-efficient PyTorch path (chunked; never holds the big intermediate). What CPU users get.
  "reference" the naive oracle that materialises everything. For tests and debugging only.
  "auto"      "triton" on CUDA when triton imports, else "torch".

Nothing here queries devices at import time.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

import torch

BACKENDS = ("auto", "triton", "torch", "reference")


_TRITON_IMPORTABLE: Optional[bool] = None


def triton_importable() -> bool:
    # a plain module-level cache: torch.compile traces through this without lru_cache warnings
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        _TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_IMPORTABLE


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on ``device``; None when it can."""
    if not triton_importable():
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_active():
            return None
        return ("tensors are on CPU and TRITON_INTERPRET=1 is not set; the CPU path is backend='torch' "
                "(the Triton interpreter is for tests only)")
    return f"Triton kernels support CUDA (or CPU under TRITON_INTERPRET=1), not device type {device.type!r}"


def choose(op: str, backend: str, device: torch.device,
           triton_rejects: Optional[Callable[[], Optional[str]]] = None) -> str:
    """Resolve ``backend`` for ``op`` on ``device``.

    ``triton_rejects`` returns a reason string when the Triton kernel cannot take these inputs (an option it
    does not implement, say), or None. An explicit ``backend="triton"`` that cannot run raises ValueError with
    the reason; ``"auto"`` falls back to the torch path silently, since that path is always correct.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("torch", "reference"):
        return backend
    reason = triton_unavailable_reason(device)
    if reason is None and triton_rejects is not None:
        reason = triton_rejects()
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"{op}: backend='triton' cannot run: {reason}")
        return "triton"
    # auto: Triton only on real GPUs; CPU users get the torch path, never the interpreter.
    if device.type == "cuda" and reason is None:
        return "triton"
    return "torch"
