"""Peak memory of one call of an op, the same way for every benchmark file.

``peak_memory(fn, device)`` calls ``fn()`` once and returns ``(result, peak_bytes, method)``:

- CUDA ("cuda_allocator"): the caching allocator's high-water mark during the call, minus what was already
  allocated before it (inputs, weights), so the number is what the op itself needed.
- CPU ("rss_sampler"): the peak growth of the process's resident set while ``fn`` runs, read from
  /proc/self/statm by a background thread about every millisecond. ``malloc_trim(0)`` first hands freed heap
  pages back to the OS, so memory freed by an earlier call is not silently reused and missed. Peaks shorter
  than a millisecond can be missed; big intermediates (the thing we care about) live far longer. Python's garbage
  collector runs first and is paused during the call: garbage of an earlier case freed mid-call would lower the
  resident set and hide the op's own growth.
- Elsewhere (no /proc): ``(result, None, "unavailable")``.

Measure memory in a call of its own, outside the timed rounds: the sampler thread costs a little CPU time.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from typing import Any, Callable, Optional, Tuple

import torch

CUDA_METHOD = "cuda_allocator"
CPU_METHOD = "rss_sampler"
SAMPLE_INTERVAL_S = 0.001

_STATM = "/proc/self/statm"


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _load_libc()


def release_freed_heap() -> None:
    """Return free heap pages to the OS (glibc), so RSS growth measured next starts from a clean baseline."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class _RssSampler:
    """Reads the resident set size in a background thread and keeps the maximum."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open(_STATM, os.O_RDONLY)
        self.max_rss = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def read(self) -> int:
        # statm: size resident shared text lib data dt, in pages
        return int(os.pread(self.fd, 128, 0).split()[1]) * self.page_size

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.read()
            if rss > self.max_rss:
                self.max_rss = rss
            time.sleep(self.interval_s)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        # one last reading while the call's result is still alive
        self.max_rss = max(self.max_rss, self.read())
        self._stop.set()
        self._thread.join()
        os.close(self.fd)


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def peak_memory(fn: Callable[[], Any], device=None) -> Tuple[Any, Optional[int], str]:
    """Call ``fn()`` once; return ``(result, peak_bytes, method)``. ``device`` defaults to CUDA when present.

    Pass the device the op runs on: a CPU op benchmarked on a GPU machine must be measured by RSS, not by the
    CUDA allocator.
    """
    device = _resolve_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        return result, max(int(peak), 0), CUDA_METHOD
    if not os.path.exists(_STATM):
        return fn(), None, "unavailable"
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        release_freed_heap()
        with _RssSampler() as sampler:
            baseline = sampler.max_rss
            result = fn()
    finally:
        if gc_was_enabled:
            gc.enable()
    return result, max(sampler.max_rss - baseline, 0), CPU_METHOD


def live_peak_bytes(fn: Callable[[], Any], device=None) -> Tuple[Any, Optional[int]]:
    """Call ``fn()`` once under the profiler; return ``(result, peak)``, ``peak`` being the most bytes live at once
    on ``device`` (default CPU) among the allocations made during the call, from the allocation and free events the
    profiler records (the analogue of CUDA's ``max_memory_allocated``: no heap memory kept by the C allocator after
    a free, no sampling). Slow (the profiler records every op): one call, outside any timing."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cpu") if device is None else torch.device(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        result = fn()
    events = []
    for event in prof._memory_profile()._op_tree.dfs():
        if event.typed[0] == _EventType.Allocation:
            fields = event.typed[1]
            if fields.device.type == device.type:
                events.append((event.start_time_ns, fields.alloc_size, fields.ptr))
    events.sort()
    sizes: dict = {}
    live = peak = 0
    for _, size, ptr in events:
        if size > 0:
            sizes[ptr] = size
            live += size
            peak = max(peak, live)
        else:
            live -= sizes.pop(ptr, 0)   # frees of memory allocated before the call do not count
    return result, peak

