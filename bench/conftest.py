"""Shared set-up for every ``bench/bench_<op>.py`` file. How to write a case:

    from bench.conftest import QUICK, DEVICE, run_case

    SHAPES = [(1024, 128)] if QUICK else [(16384, 256), (65536, 256)]

    @pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
    def test_contrastive_fwd_bwd(benchmark, impl):
        ...build inputs on DEVICE, skip what cannot run here (triton on CPU) with pytest.skip(reason)...
        peer = import_peer("inf_cl", "inf-cl")        # a peer absent or broken is skipped, never faked
        run_case(benchmark, step, op="contrastive", impl=impl, shape=f"B={B},D={D}", dtype=dtype,
                 device=DEVICE, flops=6 * B * B * D)

``run_case`` (1) calls ``warmup_rounds`` times (compilation, CUDA context), (2) measures the op's peak memory in
one call of its own (bench/_mem.py), (3) times it with pytest-benchmark in pedantic mode (fixed rounds, one
iteration; on GPU a synchronised wrapper plus a CUDA-event median, see bench/_timing.py), and (4) fills
``benchmark.extra_info`` with the keys bench/report.py reads: op, impl, shape, size, dtype, device,
peak_mem_bytes, mem_method, time_s, time_method, and, when given, flops / bytes with the achieved rate
(flop_per_s / bytes_per_s) and its fraction of the device's ceiling for the math the kernel runs
(bench/_ceilings.py: spec sheet, dense; fp32 = IEEE FMA, not TF32; unknown on CPU, so omitted).

``impl`` names: "reference", "torch", "triton", "cuda", "cpp", and peers: "torch_eager", "torch_native", "torch_compile",
"liger", "cce", "inf_cl", "faiss", "torch_topk". Extra keyword arguments are stored as they are; two that
bench/report.py reads: ``mode`` (separates rows, e.g. "softmax" / "pairwise") and ``baseline`` (the impl the
row's ratios are against; default "reference", else the first of torch_native / torch_eager / faiss / ...
present; on a GPU the loss benches name torch_eager). ``size``
(the plots' x axis) defaults to the product of the numbers in ``shape``. Skipped cases and their reasons are
saved in the JSON ("karma_skipped") and listed under each table.

``KARMA_BENCH_QUICK=1`` (CI smoke run, < 3 minutes on 2 cores): use small shapes; rounds default to 2.
Nothing here asserts speed: targets are read off the report.
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from bench._ceilings import device_ceilings, flop_ceiling
from bench._mem import peak_memory
from bench._timing import synchronized, time_op

QUICK = os.environ.get("KARMA_BENCH_QUICK") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# KARMA_BENCH_GPU_ONLY=1 (bench/gpu_check.sh): on a GPU run only the GPU cases at the peers' shapes (ours, the
# eager bf16 baselines, the peers), none of the slow CPU-side or fp32 reference cases; on a CPU every case skips.
GPU_ONLY = os.environ.get("KARMA_BENCH_GPU_ONLY") == "1"
# KARMA_BENCH_ROUNDS / KARMA_BENCH_REP: timed rounds per case and CUDA-event repetitions (sized to a budget)
ROUNDS = int(os.environ["KARMA_BENCH_ROUNDS"]) if os.environ.get("KARMA_BENCH_ROUNDS") else None
CUDA_EVENT_REP = int(os.environ.get("KARMA_BENCH_REP") or (5 if QUICK else 20))
GPU_ONLY_SKIP = "KARMA_BENCH_GPU_ONLY=1 and no CUDA device: the GPU cases cannot run here"


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_size(shape: str) -> int:
    """Product of the numbers in a shape string like "B=16384,D=256" (the x axis of the report's plots)."""
    size = 1
    for number in re.findall(r"=(\d+)", shape):
        size *= int(number)
    return size


def run_case(benchmark, fn: Callable[[], Any], *, op: str, impl: str, shape: str, dtype, device,
             flops: Optional[float] = None, bytes: Optional[float] = None, size: Optional[float] = None,
             rounds: Optional[int] = None, warmup_rounds: Optional[int] = None, math: Optional[str] = None,
             **extra) -> Any:
    """Warm up, measure peak memory, time ``fn()`` with pytest-benchmark and record the common extra_info.

    ``fn`` takes no arguments and does the whole measured step (e.g. forward + backward). ``flops`` / ``bytes``
    are per call. ``math`` names the ceiling when the arithmetic is not the dtype's default (e.g. "tf32"; see
    bench/_ceilings.py). ``extra`` keys (JSON-serialisable) are stored as they are. Returns ``fn``'s last result.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if rounds is None:
        rounds = ROUNDS or ((3 if QUICK else 10) if on_gpu else (2 if QUICK else 3))
    if warmup_rounds is None:
        # GPU: CUDA context and Triton JIT; torch.compile: tracing and codegen, whose memory is not the op's.
        # A plain CPU op needs none: the memory call below doubles as the timing's warm-up.
        warmup_rounds = 1 if on_gpu or "compile" in impl else 0
    for _ in range(warmup_rounds):
        fn()
    _, peak_bytes, mem_method = peak_memory(fn, device)

    if benchmark.group is None:
        benchmark.group = f"{op} {shape} {dtype_name(dtype)}"
    result = benchmark.pedantic(synchronized(fn, device), rounds=rounds, iterations=1, warmup_rounds=0)

    time_s, time_method = None, None
    if on_gpu:
        time_s, time_method = time_op(fn, device, warmup=1, rep=CUDA_EVENT_REP), "cuda_events"
    elif benchmark.stats is not None:  # None under --benchmark-disable
        time_s, time_method = benchmark.stats.stats.median, "wall_clock"

    info = benchmark.extra_info
    info.update(op=op, impl=impl, shape=shape, size=size if size is not None else shape_size(shape),
                dtype=dtype_name(dtype), device=device.type, peak_mem_bytes=peak_bytes, mem_method=mem_method,
                time_s=time_s, time_method=time_method)
    if on_gpu:
        info["device_name"] = torch.cuda.get_device_name(device)
    ceilings = device_ceilings(device)
    if flops is not None:
        info["flops"] = float(flops)
        if time_s:
            info["flop_per_s"] = flops / time_s
            ceiling = flop_ceiling(ceilings, dtype_name(dtype), math)
            if ceiling:
                info["flop_ceiling"] = ceiling
                info["flop_fraction_of_peak"] = flops / time_s / ceiling
    if bytes is not None:
        info["bytes"] = float(bytes)
        if time_s:
            info["bytes_per_s"] = bytes / time_s
            if ceilings:
                info["bytes_fraction_of_peak"] = bytes / time_s / ceilings["bytes_per_s"]
    info.update(extra)
    return result


def import_peer(module: str, package: str):
    """``module`` of a peer, or a skip with the reason: not installed (``pip install package``), or installed but
    broken here (an import that raises something else, e.g. against this torch / Triton: skipped, not an error)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        pytest.skip(f"{package} is not installed (pip install {package}): {error}")
    except Exception as error:  # noqa: BLE001 - a peer's own import failure is reported, never hidden
        pytest.skip(f"{package} is installed but fails to import here: {type(error).__name__}: {error}")


def pytest_collect_file(file_path: Path, parent):
    """Collect ``bench/bench_*.py`` when pytest is given the folder: the project's python_files lists only
    test_*.py. Files named on the command line, or already matching python_files, pytest collects itself."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if file_path.parent != Path(__file__).parent or parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture
def bench_device() -> str:
    return DEVICE


# Cases skipped in this session (peers not installed, GPU-only paths on CPU, ...), with pytest's reason; saved in
# the pytest-benchmark JSON as "karma_skipped" so bench.report can say why a column is missing.
_SKIPPED: list = []


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        _SKIPPED.append({"nodeid": report.nodeid, "reason": _skip_reason(report)})


def pytest_collectreport(report):
    if report.skipped:  # a whole bench file skipped at import (module-level importorskip)
        _SKIPPED.append({"nodeid": report.nodeid, "reason": _skip_reason(report)})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["karma_skipped"] = list(_SKIPPED)


def pytest_report_header(config):
    where = torch.cuda.get_device_name(0) if HAS_CUDA else f"cpu ({os.cpu_count()} cores)"
    mode = "quick (KARMA_BENCH_QUICK=1)" if QUICK else "full"
    return f"karma bench: device {where}, {mode} shapes, torch {torch.__version__}"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["karma_device"] = torch.cuda.get_device_name(0) if HAS_CUDA else "cpu"
    machine_info["karma_quick"] = QUICK
    machine_info["torch_version"] = torch.__version__
    machine_info["karma_versions"] = _versions()


def _versions() -> str:
    """Triton, CUDA and driver versions, recorded beside every figure of the run."""
    import subprocess

    import triton

    text = f"triton {triton.__version__}"
    if HAS_CUDA:
        text += f", CUDA {torch.version.cuda}"
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
            text += f", driver {driver or '?'}"
        except (OSError, subprocess.SubprocessError):
            text += ", driver ?"
    return text


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """pytest-benchmark writes no JSON when no case ran (every one skipped: a GPU-only run on a CPU, a peer-only
    file without the peers); write one holding the skipped cases and their reasons, so the report can say why."""
    target = session.config.getoption("benchmark_json", None)
    # pytest-benchmark >= 5.2 gives the path; older versions an open file (argparse.FileType), closed once written
    written = target is None or (target.closed if hasattr(target, "write") else Path(target).exists())
    if written:
        return
    import datetime
    import json

    machine_info = {}
    pytest_benchmark_update_machine_info(session.config, machine_info)
    document = json.dumps({"machine_info": machine_info, "benchmarks": [], "karma_skipped": _SKIPPED,
                           "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat()}, indent=1)
    if hasattr(target, "write"):
        with target:
            target.write(document.encode())
    else:
        Path(target).write_text(document)
