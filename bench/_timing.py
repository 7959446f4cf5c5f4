"""Timing that tells the truth on both devices.

CPU: pytest-benchmark's own wall clock is right, because CPU ops finish before they return. Use pedantic mode
so the number of calls is fixed and small (a fwd+bwd of a big reference takes seconds):
``benchmark.pedantic(fn, rounds=R, iterations=1, warmup_rounds=W)``. ``bench.conftest.run_case`` does this.

GPU: kernels run asynchronously, so a bare wall clock measures launch time. ``time_op(fn, "cuda")`` records CUDA
events around each call (after warm-up calls that also absorb Triton's JIT compilation), clears the L2 cache
between calls like ``triton.testing.do_bench``, and returns the median in seconds. ``run_case`` still lets
pytest-benchmark time a synchronised wrapper (so its tables stay meaningful) and stores the CUDA-event median in
``extra_info["time_s"]`` with ``extra_info["time_method"] = "cuda_events"``; bench.report prefers that value.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

# Larger than the L2 of any current GPU (H100: 50 MB, H200: 60 MB), so each timed call starts with a cold cache.
_L2_FLUSH_BYTES = 256 * 1024 * 1024


def synchronized(fn: Callable[[], Any], device) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation, so a wall clock around it sees the GPU work."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


def time_op(fn: Callable[[], Any], device, *, warmup: int = 3, rep: int = 20, flush_l2: bool = True) -> float:
    """Median seconds of one ``fn()`` call on ``device``: CUDA events on GPU, perf_counter on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rep):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3
