"""The GPU merge: its warp algorithm (csrc/topk_merge_warp.h) where it differs from the CPU merge — keys computed on
the stored bits of every fp16/bf16 value, the select's tie cut on ids, the limits of the warp path — run here as
the host build (32 lanes in lockstep, backend="device_emulation"; tests/test_topk_merge.py runs every parity case
against it too), and the CUDA sources' build checks (nvcc for sm_90 with a ptxas audit; the torch binding)."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from karma_kernels import topk_merge
from karma_kernels.topk_merge import topk_merge_reference

EMULATED = "device_emulation"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(distances, ids, k, *, metric="l2", dedup=False):
    return topk_merge_reference([np.asarray(d, dtype=np.float64) for d in distances], ids, k,
                                largest=metric == "ip", dedup=dedup)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # NaN payloads
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_every_16_bit_value_keeps_its_rank_and_its_bits(dtype, metric):
    # All 65536 bit patterns (both zeros, subnormals, infinities, every NaN payload), 256 per query, unsorted,
    # each query's result its whole row in rank order.
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).reshape(256, 256)
    shards = list(values.reshape(256, 4, 64).unbind(1))  # four shards of 64 per query
    ids = [torch.arange(64 * s, 64 * s + 64).expand(256, 64).contiguous() for s in range(4)]
    out_distances, out_ids = topk_merge(shards, ids, 256, metric=metric, sorted=False, backend=EMULATED)
    truth = reference([d.float().numpy() for d in shards], [i.numpy() for i in ids], 256, metric=metric)
    np.testing.assert_array_equal(out_ids.numpy(), truth[1])
    np.testing.assert_array_equal(out_distances.float().numpy(), truth[0])
    # Same bits as the CPU op writes: NaN as the canonical NaN, -0 as +0.
    cpu = topk_merge(shards, ids, 256, metric=metric, sorted=False)
    assert torch.equal(out_distances.view(torch.int16), cpu[0].view(torch.int16))


@pytest.mark.parametrize("dedup", [False, True])
def test_tie_group_cut_by_the_smallest_ids_equal_ids_included(dedup):
    # Every candidate at one of two distances, ids drawn from a small range (repeats within a query): the k-th
    # key's tie group is cut by a radix select over its ids, and the cut may fall inside a run of equal ids.
    rng = np.random.default_rng(21)
    num_queries, widths = 16, [33, 64, 5, 70]
    distances = [rng.integers(0, 2, (num_queries, w)).astype(np.float32) for w in widths]
    ids = [rng.integers(0, 30, (num_queries, w)) * (2**40 + 1) for w in widths]  # ids with high bits set
    for k in (1, 7, 31, 32, 33, 100, 171):
        for metric in ("l2", "ip"):
            out = topk_merge(distances, ids, k, metric=metric, sorted=False, dedup=dedup, backend=EMULATED)
            truth = reference(distances, ids, k, metric=metric, dedup=dedup)
            np.testing.assert_array_equal(out[1], truth[1])
            np.testing.assert_array_equal(out[0], truth[0])


def test_padding_everywhere_then_the_select_repeats_until_none_is_left():
    # Most candidates are padding carrying the best distances: each select round meets new padding.
    rng = np.random.default_rng(22)
    distances = [np.sort(rng.standard_normal((20, 48)).astype(np.float32), axis=1) for _ in range(3)]
    ids = [np.where(rng.random((20, 48)) < 0.8, -1, rng.integers(0, 10**6, (20, 48))) for _ in range(3)]
    for k in (1, 10, 40, 200):
        out = topk_merge(distances, ids, k, sorted=False, backend=EMULATED)
        truth = reference(distances, ids, k)
        np.testing.assert_array_equal(out[1], truth[1])
        np.testing.assert_array_equal(out[0], truth[0])


def test_the_warp_path_refuses_what_one_warp_cannot_hold():
    d = np.zeros((2, 1, 40000), np.float32)
    i = np.zeros((2, 1, 40000), np.int64)
    with pytest.raises(ValueError, match="one warp's shared memory"):
        topk_merge(d, i, 10000, backend=EMULATED)
    with pytest.raises(ValueError, match="at most 64 shards per call"):
        topk_merge(np.zeros((65, 1, 2), np.float32), np.zeros((65, 1, 2), np.int64), 2, backend=EMULATED)


def test_opcheck_of_the_emulated_op():
    rng = np.random.default_rng(23)
    d = [torch.from_numpy(np.sort(rng.random((5, w), dtype=np.float32), axis=1)) for w in (4, 1, 6)]
    i = [torch.from_numpy(rng.integers(0, 100, (5, w))) for w in (4, 1, 6)]
    for args in ((d, i, 6, False, torch.tensor([0, 100, 200]), True, False), (d, i, 3, True, None, False, True)):
        torch.library.opcheck(torch.ops.karma.topk_merge_warp_emulated.default, args)


def _cuda_home():
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


# The kernel's instantiations: 4 distance formats x 2 metrics (csrc/topk_merge_warp.h, dispatch).
KERNEL_INSTANTIATIONS = 8


def test_cuda_kernel_compiles_for_sm90_without_local_memory(tmp_path):
    """The CUDA kernel builds for sm_90 as setup.py builds it (-O3), warning-free, and ptxas reports for every
    instantiation a 0-byte stack frame and no spills: the warp merge keeps its state in registers and shared
    memory, never in local memory. Registers per instantiation are printed (pytest -s)."""
    import re

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: the CUDA kernel source cannot be compile-checked here")
    result = subprocess.run(
        [nvcc, "-c", "-arch=sm_90", "-std=c++17", "-O3", "-Xptxas", "-v", "-Werror", "all-warnings",
         f"-I{os.path.join(ROOT, 'csrc')}", os.path.join(ROOT, "csrc", "topk_merge_cuda.cu"),
         "-o", str(tmp_path / "topk_merge_cuda.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = result.stdout + result.stderr
    entries = re.findall(r"Compiling entry function '(\S+)' for 'sm_90'.*?(\d+) bytes stack frame, (\d+) bytes spill "
                         r"stores, (\d+) bytes spill loads.*?Used (\d+) registers", report, re.S)
    assert len(entries) == KERNEL_INSTANTIATIONS, report
    for name, stack, spill_stores, spill_loads, registers in entries:
        print(f"{name}: {registers} registers, stack {stack} B, spills {spill_stores}/{spill_loads} B")
        assert (int(stack), int(spill_stores), int(spill_loads)) == (0, 0, 0), f"{name} uses local memory:\n{report}"


def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """The torch-facing CUDA binding (built only with a CUDA torch) is syntax-checked here so it cannot rot.
    A CPU torch lacks one generated CUDA header (cuda_cmake_macros.h); an empty stand-in replaces it."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cuda_home = _cuda_home()
    compiler = shutil.which("g++") or shutil.which("c++")
    if cuda_home is None or compiler is None:
        pytest.skip("the CUDA runtime headers or a C++ compiler are missing: the binding cannot be checked")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [str(tmp_path), *include_paths(), os.path.join(cuda_home, "include"),
                sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]
    result = subprocess.run(
        [compiler, "-std=c++20", "-fsyntax-only", "-DKARMA_WITH_CUDA", *[f"-I{path}" for path in includes],
         os.path.join(ROOT, "csrc", "topk_merge_cuda_binding.cpp")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
