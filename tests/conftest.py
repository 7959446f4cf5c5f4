"""Test set-up shared by every test file.

TRITON_INTERPRET=1 must be set before any ``@triton.jit`` kernel is defined, so it is set here, at collection
time, when no CUDA device is present: the Triton kernels themselves then run (slowly) on CPU tensors in CI.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Device the Triton path is tested on: the GPU when present, else CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
# KARMA_FULL_TESTS=1 runs the full shape set (meant for GPUs); the default is the quick CI set.
FULL = os.environ.get("KARMA_FULL_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="full shape set: set KARMA_FULL_TESTS=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not FULL:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_device():
    return TRITON_DEVICE


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models gain nothing from more threads; one avoids OpenMP spinning on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
