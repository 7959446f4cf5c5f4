"""Build script for the optional compiled extension ``karma_kernels._C``.

The CPU part (OpenMP) is always built when a C++ compiler is present. The CUDA part is built only when the
installed torch has CUDA and nvcc is found, or when ``KARMA_FORCE_CUDA=1``; ``KARMA_NO_CUDA=1`` builds the CPU part alone. Install with
``pip install --no-build-isolation -e .`` so the extension is compiled against the torch already installed.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources or os.environ.get("KARMA_NO_EXTENSION") == "1":
        return [], {}
    import numpy  # topk_merge_numpy.cpp uses numpy's C API (numpy is a dependency, installed before the build)
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cuda = os.environ.get("KARMA_FORCE_CUDA") == "1"
    use_cuda = force_cuda or (torch.cuda.is_available() or torch.version.cuda is not None) and CUDA_HOME is not None
    if os.environ.get("KARMA_NO_CUDA") == "1":  # CPU-only build, e.g. when nvcc does not match torch's CUDA
        use_cuda = False
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    openmp = ["-fopenmp"]
    # torch 2.13 headers are C++20 (bit-field initialisers); the plain .cu needs only C++17.
    cxx_flags = ["-O3", "-std=c++20", *openmp]
    if use_cuda and cu_sources:
        ext = CUDAExtension(
            "karma_kernels._C",
            cpp_sources + cu_sources,
            include_dirs=[os.path.join(ROOT, "csrc"), numpy.get_include()],
            define_macros=[("KARMA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension(
            "karma_kernels._C",
            cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc"), numpy.get_include()],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
