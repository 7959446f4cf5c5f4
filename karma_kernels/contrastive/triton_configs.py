"""Which contrastive kernels run, with which tiles, grids and precision: one source for the launchers
(``triton_impl``), the autotuner and the kernel audit (``audit_plans``, read by ``python -m bench.kernel_audit``).

``forward_launches`` / ``backward_launches`` return :class:`Launch` records (kernel, compile-time constants, grid,
warps, stages and the matmul work counted from the grid and tile loops); the launchers start exactly these.
Default GPU configs were chosen with the sm_90 audit (``docs/kernel_audit.md``): no register spills, shared memory
within 227 KiB, wgmma and cp.async in the PTX.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import triton

from .._backend import interpreter_active
from .triton_backward import _grad_keys_kernel, _grad_query_kernel
from .triton_forward import _forward_kernel, _symmetric_forward_kernel

MAX_RESIDENT_D = 256        # up to this D a program's own block stays resident (its dots have K = D)
CHUNK_D = 64                # D chunk of the logit dots beyond that
SLICE_D = 128               # D slice of a gradient program's output beyond that
SHARED_MEMORY_LIMIT = 227 * 1024
DEFAULT_SMS = 132           # programs of the symmetric forward's grid without a device to ask (H100/H200 SXM)


@dataclass(frozen=True)
class Config:
    """Tiles of one kernel: query rows and keys per tile, warps, pipeline stages."""

    block_b: int
    block_m: int
    num_warps: int = 8
    num_stages: int = 2


@dataclass(frozen=True)
class Configs:
    forward: Config
    grad_keys: Config          # the atomic schedule's only kernel, the deterministic schedule's dK kernel
    grad_query: Config         # the deterministic schedule's dQ kernel


def _gpu_defaults(dtype: torch.dtype, pairwise: bool, symmetric: bool, dim: int) -> Configs:
    if dtype == torch.float32:          # float16 (hi, lo) parts: twice the shared memory of a half-precision tile
        # gradient kernels: 32 keys per tile for D > 64 (at 64 x 64 the symmetric, key_ids and logq variants
        # spill 16-256 B at D = 256, docs/kernel_audit.md); 64 at D <= 64, where the dK dot with 32 keys is
        # mma.sync (its M < 64) and registers are plenty
        grad = Config(64, 64, 8, 2) if dim <= 64 else Config(64, 32, 8, 2)
        return Configs(Config(64, 64, 8, 2), grad, grad)
    forward = Config(128, 64, 8, 2) if pairwise else Config(128, 64, 8, 3)
    # the symmetric tile's column terms need the registers of a third stage
    return Configs(forward, Config(64, 64, 8, 2), Config(64, 64, 8, 2 if symmetric else 3))


def default_configs(dtype: torch.dtype = torch.bfloat16, pairwise: bool = False, symmetric: bool = False,
                    dim: int = MAX_RESIDENT_D) -> Configs:
    """Default tiles. Under the interpreter 16-wide tiles, so that tests cover several tiles per axis."""
    if interpreter_active():
        small = Config(16, 16, 1, 1)
        return Configs(small, small, small)
    return _gpu_defaults(dtype, pairwise, symmetric, dim)


# float32 dots under the interpreter: "ieee" (float32 products); tests set "split_f16" to run the GPU path's
# float16-parts arithmetic (the interpreter's float16 dot is exact products with float32 accumulation)
INTERPRETED_FLOAT32_DOT = "ieee"


def dot_mode(dtype: torch.dtype, dim: int = MAX_RESIDENT_D) -> str:
    """``DOT`` of the kernels (see triton_tiles). float32 on GPU: "split_f16" while the rows stay resident
    (D <= MAX_RESIDENT_D: q and k pre-split into float16 parts by the launcher, three float16 tensor-core products
    per dot), "tf32x3" over D chunks beyond. Under the interpreter "ieee" (``INTERPRETED_FLOAT32_DOT`` for
    float32)."""
    if dtype == torch.float32:
        mode = INTERPRETED_FLOAT32_DOT if interpreter_active() else "split_f16"
        return mode if dim <= MAX_RESIDENT_D else ("ieee" if interpreter_active() else "tf32x3")
    return "ieee" if interpreter_active() else "native"


def grad_dot_mode(dtype: torch.dtype, dim: int = MAX_RESIDENT_D) -> str:
    """``GRAD_DOT`` of the gradient kernels (G K, G^T Q): the logits' mode, except float32 FMA beside tf32x3 (D > 256:
    tf32 wgmma cannot read the transposed shared-memory operands these dots need, and its register splits of
    the gradient tiles spill) and "split_f16_t" beside "split_f16" for D > 64 (transposed accumulators, see
    triton_tiles._mma_grad; at D <= 64 their D halves would be the wgmma's M < 64). The logits always keep
    ``dot_mode``, so that the backward recomputes bitwise the forward's logits."""
    mode = dot_mode(dtype, dim)
    if mode == "split_f16" and dim > 64:
        return "split_f16_t"
    return "ieee" if mode == "tf32x3" else mode


def resident_limit(dtype: torch.dtype) -> int:
    """Largest D whose kernels keep whole rows resident: MAX_RESIDENT_D for every dtype (float32 through its float16
    parts; with tf32x3 or FMA dots its resident gradient tiles spilled in every config tried,
    docs/kernel_audit.md)."""
    return MAX_RESIDENT_D



def d_tiling(dim: int, resident_limit: int = MAX_RESIDENT_D) -> Dict[str, Any]:
    """BLOCK_D / BLOCK_DV / RESIDENT / EVEN_D for a given D."""
    if dim <= resident_limit:
        block = max(32, triton.next_power_of_2(dim))   # tiles are held as two halves: K >= 16 for tl.dot
        return dict(BLOCK_D=block, BLOCK_DV=block, RESIDENT=True, EVEN_D=block == dim)
    return dict(BLOCK_D=CHUNK_D, BLOCK_DV=SLICE_D, RESIDENT=False, EVEN_D=dim % SLICE_D == 0)


def shared_memory_estimate(kind: str, config: Config, block_d: int, element_bytes: int, atomic: bool = True) -> int:
    """A static upper estimate of a resident-tile kernel's shared memory (for pruning autotune configs): the
    resident block, ``num_stages`` buffers of the streamed tile and one float32 tile for layout conversions.
    ``element_bytes``: of one operand element (4 for float32's float16 hi + lo parts)."""
    own, streamed = (config.block_b, config.block_m) if kind in ("forward", "grad_query") else \
        (config.block_m, config.block_b)
    staging = config.block_b * config.block_m * 4
    if kind == "grad_keys":     # G^T (and G) as dot operands, a float32 dQ half-tile on its way to the atomics
        staging += config.block_b * config.block_m * element_bytes
        if atomic:
            staging += config.block_b * config.block_m * element_bytes + config.block_b * block_d // 2 * 4
    return (own + config.num_stages * streamed) * block_d * element_bytes + staging


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what the launcher starts and the audit compiles."""

    name: str
    kind: str                           # "forward", "grad_query" or "grad_keys"
    kernel: Any
    constexprs: Dict[str, Any]
    config: Config
    grid: Tuple[int, ...]
    matmul_flops: float                 # 2·m·n·k per tl.dot, over the grid and tile loops
    phase: str = "forward"
    grid_fn: Optional[Callable] = field(default=None, compare=False)   # grid of a config's meta-parameters


def symmetric_splits(row_blocks: int, key_tiles: int, programs: int) -> Tuple[int, int]:
    """(S_r, S_c) of the symmetric forward's grid: about ``programs`` (one wave: the SM count) programs, as square
    as it goes, each with at least one row block and, where there are enough, two key tiles."""
    split_r = max(1, min(row_blocks, math.isqrt(max(programs, 1))))
    split_c = max(1, min(programs // split_r, key_tiles // 2 if key_tiles >= 2 else 1))
    return split_r, split_c


def forward_launches(batch: int, num_keys: int, dim: int, dtype: torch.dtype, pairwise: bool, symmetric: bool,
                     has_key_ids: bool, has_logq: bool, config: Optional[Config] = None,
                     splits: Optional[Tuple[int, int]] = None, num_sms: Optional[int] = None) -> List[Launch]:
    """One launch: the row pass, or for ``symmetric`` the one-pass row + column statistics on an (S_r, S_c) grid
    (``splits``, else :func:`symmetric_splits` of ``num_sms``, default :data:`DEFAULT_SMS`)."""
    config = config or default_configs(dtype, pairwise, symmetric, dim).forward
    tiling = d_tiling(dim, resident_limit(dtype))
    constexprs = dict(HAS_KEY_IDS=has_key_ids, HAS_LOGQ=has_logq, PAIRWISE=pairwise, RESIDENT=tiling["RESIDENT"],
                      EVEN_D=tiling["EVEN_D"] and tiling["RESIDENT"], BLOCK_B=config.block_b,
                      BLOCK_M=config.block_m, BLOCK_D=tiling["BLOCK_D"], DOT=dot_mode(dtype, dim))
    chunks = 1 if tiling["RESIDENT"] else triton.cdiv(dim, CHUNK_D)
    row_blocks, key_tiles = triton.cdiv(batch, config.block_b), triton.cdiv(num_keys, config.block_m)
    # every tile once (the symmetric grid partitions the row blocks x key tiles exactly)
    flops = row_blocks * key_tiles * chunks * 2.0 * config.block_b * config.block_m * tiling["BLOCK_D"]
    if not symmetric:
        return [Launch("forward", "forward", _forward_kernel, constexprs, config, (row_blocks,), flops,
                       grid_fn=lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]),))]
    del constexprs["PAIRWISE"]

    if splits is None:
        splits = symmetric_splits(row_blocks, key_tiles, num_sms or DEFAULT_SMS)
    grid = (max(1, min(splits[0], row_blocks)), max(1, min(splits[1], key_tiles)))
    # the launcher sizes the partial buffers by this grid, so autotuning keeps it: S_r <= the row blocks of the
    # largest tuned BLOCK_B (the default's), S_c <= half the key tiles of the default BLOCK_M (every range non-empty)
    return [Launch("forward_symmetric", "forward", _symmetric_forward_kernel, constexprs, config, grid, flops,
                   grid_fn=lambda meta: grid)]


def backward_launches(batch: int, num_keys: int, dim: int, dtype: torch.dtype, pairwise: bool, symmetric: bool,
                      has_key_ids: bool, has_logq: bool, logq_grad: bool, deterministic: bool,
                      configs: Optional[Configs] = None) -> List[Launch]:
    """Atomic schedule (one kernel) unless ``deterministic`` or float32 (whose atomic kernel spills registers in
    every config tried, the float16-parts one included: docs/kernel_audit.md); else dQ + dK kernels."""
    configs = configs or default_configs(dtype, pairwise, symmetric, dim)
    tiling = d_tiling(dim, resident_limit(dtype))
    atomic = not deterministic and dtype != torch.float32
    chunks = 1 if tiling["RESIDENT"] else triton.cdiv(dim, CHUNK_D)
    slices = triton.cdiv(dim, tiling["BLOCK_DV"])
    base = dict(HAS_KEY_IDS=has_key_ids, HAS_LOGQ=has_logq, PAIRWISE=pairwise, SYMMETRIC=symmetric,
                DOT=dot_mode(dtype, dim), GRAD_DOT=grad_dot_mode(dtype, dim), RESIDENT=tiling["RESIDENT"],
                EVEN_D=tiling["EVEN_D"], BLOCK_D=tiling["BLOCK_D"], BLOCK_DV=tiling["BLOCK_DV"])

    def per_tile(config: Config, dots_with_dv: int) -> float:
        logits = chunks * 2.0 * config.block_b * config.block_m * tiling["BLOCK_D"]
        return logits + dots_with_dv * 2.0 * config.block_b * config.block_m * tiling["BLOCK_DV"]

    launches = []
    if not atomic:
        config = configs.grad_query
        programs = triton.cdiv(batch, config.block_b) * slices
        launches.append(Launch(
            "grad_query", "grad_query", _grad_query_kernel,
            dict(base, BLOCK_B=config.block_b, BLOCK_M=config.block_m), config,
            (triton.cdiv(batch, config.block_b), slices),
            programs * triton.cdiv(num_keys, config.block_m) * per_tile(config, 1), phase="backward",
            grid_fn=lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), slices)))
    config = configs.grad_keys
    programs = triton.cdiv(num_keys, config.block_m) * slices
    launches.append(Launch(
        "grad_keys_atomic_dq" if atomic else "grad_keys", "grad_keys", _grad_keys_kernel,
        dict(base, LOGQ_GRAD=logq_grad, ATOMIC_DQ=atomic, BLOCK_B=config.block_b, BLOCK_M=config.block_m), config,
        (triton.cdiv(num_keys, config.block_m), slices),
        programs * triton.cdiv(batch, config.block_b) * per_tile(config, 2 if atomic else 1), phase="backward",
        grid_fn=lambda meta: (triton.cdiv(num_keys, meta["BLOCK_M"]), slices)))
    return launches


# ---------------------------------------------------------------------------------------------------------------
# autotuning (KARMA_AUTOTUNE=1, GPU only): tiles, warps and stages of every kernel; one tuning per power-of-two
# bucket of B and M (and per D, dtype and mode); configs whose shared memory cannot fit are never tried.

TUNE_SPACE = ((64, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 8, 2),
              (128, 128, 8, 2))   # (64, 32, 8, 2): float32's gradient kernels


def use_autotune() -> bool:
    return os.environ.get("KARMA_AUTOTUNE") == "1" and not interpreter_active()


def _shared_memory_limit(device) -> int:
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"])
    except Exception:   # no driver query available: the sm_90 limit
        return SHARED_MEMORY_LIMIT


def _prune(kind: str):
    def prune(configs, named_args, **kwargs):
        q = named_args["q_ptr"]
        block_d = max(kwargs.get("BLOCK_D", 0), kwargs.get("BLOCK_DV", 0))   # resident block or D slice
        limit = _shared_memory_limit(q.device)
        element_bytes = q.element_size() * (2 if kwargs.get("DOT") == "split_f16" else 1)   # (hi, lo) parts
        fits = [c for c in configs if shared_memory_estimate(
            kind, Config(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages), block_d,
            element_bytes, bool(kwargs.get("ATOMIC_DQ", True))) <= limit]
        return fits or configs[:1]
    return prune


class _Tuned:
    """triton.autotune around one kernel, remembering the winner per bucket so that a new batch size in the
    same power-of-two bucket reuses it instead of tuning again."""

    def __init__(self, kind: str, kernel, atomic: bool):
        configs = [triton.Config({"BLOCK_B": b, "BLOCK_M": m}, num_warps=w, num_stages=s) for b, m, w, s in TUNE_SPACE]
        key = ["B", "M", "D", "HAS_KEY_IDS", "HAS_LOGQ", "PAIRWISE", "SYMMETRIC", "DOT"]
        self.kernel = kernel
        self.tuner = triton.autotune(configs=configs, key=[k for k in key if k in kernel.arg_names],
                                     prune_configs_by={"early_config_prune": _prune(kind)},
                                     reset_to_zero=["dq_acc_ptr", "dlogq_ptr"] if atomic else None)(kernel)
        self.winners: Dict[tuple, Any] = {}

    def __call__(self, launch: Launch, args: tuple, bucket: tuple):
        flags = {k: v for k, v in launch.constexprs.items() if k not in ("BLOCK_B", "BLOCK_M")}
        key = bucket + tuple(sorted(flags.items())) + (str(args[0].dtype),)
        winner = self.winners.get(key)
        if winner is None:
            self.tuner[launch.grid_fn](*args, **flags)
            self.winners[key] = self.tuner.best_config
        else:
            self.kernel[launch.grid_fn(winner.kwargs)](*args, **flags, **winner.kwargs, num_warps=winner.num_warps,
                                                       num_stages=winner.num_stages)


_TUNED: Dict[tuple, _Tuned] = {}     # per (launch name, kind, atomic)


def run(launch: Launch, args: tuple, tune: bool, bucket: tuple = ()) -> None:
    """Start ``launch`` with ``args`` (autotuned when ``tune``)."""
    if tune:
        atomic = bool(launch.constexprs.get("ATOMIC_DQ"))
        key = (launch.name, launch.kind, atomic)    # the name tells the kernel (two forward kernels share a kind)
        tuned = _TUNED.get(key)
        if tuned is None:
            tuned = _TUNED[key] = _Tuned(launch.kind, launch.kernel, atomic)
        tuned(launch, args, bucket)
        return
    launch.kernel[launch.grid](*args, **launch.constexprs, num_warps=launch.config.num_warps,
                               num_stages=launch.config.num_stages)
