"""Launch plans of the linear + cross-entropy kernels: tiles, warps, stages, grids and counted matmul work.

One function per pass (``forward_launch``, ``backward_launches``) returns what the launchers start AND what the
kernel audit (``python -m bench.kernel_audit``) compiles for sm_90, so the audit sees exactly what runs.
Nothing here queries a device: the launchers pass the SM count in (the audit uses an H100/H200's 132).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import triton

from .backward_plan import plan_backward, plan_deterministic
from .triton_backward import _lce_backward_kernel, _lce_grad_hidden_kernel, _lce_grad_weight_kernel
from .triton_common import GRAD_TILE_HEADROOM
from .triton_forward import _lce_forward_kernel

H100_SMS = 132
# dWeight of fp16/bf16 weights is accumulated in fp32 bands of at most this many bytes, each cast into the
# gradient before the next (no fp32 [V, D] copy); accum_dtype="fp32" takes one full-size fp32 buffer instead.
BAND_BYTES = 16 * 2 ** 20
# forward: enough (token block, vocabulary split) programs for this many waves of one program per SM
FORWARD_WAVES = 8


@dataclass(frozen=True)
class Launch:
    name: str
    kernel: Any
    constexprs: Dict[str, Any]
    grid: Tuple[int, ...]
    num_warps: int
    num_stages: int
    matmul_flops: float
    phase: str
    extra: Dict[str, Any] = field(default_factory=dict)   # launch-time values (splits, the backward's plan)

    def options(self) -> dict:
        return dict(self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def _tiles(kernel: str, element: str, on_gpu: bool, options: bool = False) -> dict:
    """BLOCK_* / GROUP_N, warps and stages of ``kernel`` for inputs of ``element`` ("bf16", "fp16", "fp32");
    ``options``: softcap / label smoothing / bias are on (more live registers per tile: smaller tiles)."""
    if not on_gpu:
        # interpreter: a program instance costs ~1 ms, blocks are numpy arrays; few, mid-sized blocks
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=32, GROUP_N=2, num_warps=4, num_stages=1)
    half = element != "fp32"
    if kernel == "forward":
        if half:
            return dict(BLOCK_N=128, BLOCK_V=128 if options else 256, BLOCK_D=64, GROUP_N=8, num_warps=8,
                        num_stages=3)
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, GROUP_N=8, num_warps=8, num_stages=3)
    if kernel == "backward":
        if half:
            return dict(BLOCK_N=64 if options else 128, BLOCK_V=128, BLOCK_D=64, GROUP_N=8, num_warps=8,
                        num_stages=3)
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, GROUP_N=8, num_warps=8, num_stages=3)
    # the deterministic pair (each program the only writer of its fp32 rows)
    if half:
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)
    return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3)


def _precision(element: str, on_gpu: bool) -> dict:
    return dict(UPCAST=not on_gpu, DOT_PRECISION="tf32x3" if on_gpu and element == "fp32" else "ieee")


def _split(config: dict) -> Tuple[dict, int, int]:
    config = dict(config)
    return config, config.pop("num_warps"), config.pop("num_stages")


def _dot_flops(m: int, n: int, depth: int, block_d: int) -> float:
    return 2.0 * m * n * triton.cdiv(depth, block_d) * block_d


def forward_launch(n_tokens: int, vocab: int, dim: int, element: str, *, on_gpu: bool, sms: int,
                   has_bias: bool, has_softcap: bool, has_smoothing: bool) -> Launch:
    config, warps, stages = _split(_tiles("forward", element, on_gpu, has_bias or has_softcap or has_smoothing))
    bn, bv = config["BLOCK_N"], config["BLOCK_V"]
    token_blocks, vocab_tiles = triton.cdiv(n_tokens, bn), triton.cdiv(vocab, bv)
    splits = max(1, min(vocab_tiles, triton.cdiv(FORWARD_WAVES * sms, token_blocks)))
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)        # no empty split
    constexprs = dict(config, HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, HAS_SMOOTHING=has_smoothing,
                      **_precision(element, on_gpu))
    flops = token_blocks * vocab_tiles * _dot_flops(bn, bv, dim, config["BLOCK_D"])
    return Launch("forward", _lce_forward_kernel, constexprs, (token_blocks * splits,), warps, stages, flops,
                  "forward", dict(splits=splits, tiles_per_split=tiles_per_split))


def band_rows(vocab: int, dim: int, element: str, accum_dtype: Optional[str], block_v: int) -> int:
    """Vocabulary rows of one fp32 dWeight band (``vocab`` = one band, the gradient itself or a full buffer)."""
    if element == "fp32" or accum_dtype == "fp32":
        return vocab
    rows = max(block_v, BAND_BYTES // (4 * max(dim, 1)) // block_v * block_v)
    return min(rows, vocab)


_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_STAGE_NAMES = {1: "backward", 2: "backward dHidden of the last rows", 3: "backward dWeight of the last rows"}


def backward_launches(n_tokens: int, vocab: int, dim: int, element: str, *, on_gpu: bool, deterministic: bool,
                      has_bias: bool, has_softcap: bool, filtering: bool, need_hidden: bool, need_weight: bool,
                      need_bias: bool, accum_dtype: Optional[str] = None, vocab_order: bool = False,
                      hidden_rows: Optional[int] = None) -> List[Launch]:
    """The backward's launches: the one-pass kernel, one variant per stage of its plan (``extra["plan"]``, a
    ``backward_plan.BackwardPlan``; ``extra["stage"]``), or the deterministic pair. ``hidden_rows``: rows of
    dHidden (default ``n_tokens``)."""
    common = dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, FILTER=filtering,
                  HALF_GRAD=on_gpu and element != "fp32", HEADROOM=GRAD_TILE_HEADROOM, **_precision(element, on_gpu))
    if not deterministic:
        config, warps, stages = _split(_tiles("backward", element, on_gpu, has_bias or has_softcap))
        bn, bv, bd = config["BLOCK_N"], config["BLOCK_V"], config["BLOCK_D"]
        # dHidden's first whole D blocks, up to D / 2 columns, keep their fp32 sums in the fp16/bf16 output itself
        split = (dim // 2) // bd * bd if element != "fp32" and dim % 2 == 0 else 0
        plan = plan_backward(vocab, n_tokens if hidden_rows is None else hidden_rows, dim,
                             band_rows(vocab, dim, element, accum_dtype, bv), bv, elem_bytes=_ELEMENT_BYTES[element],
                             need_hidden=need_hidden, need_weight=need_weight, full_buffer=accum_dtype == "fp32",
                             scattered=vocab_order, hidden_split=split)
        token_blocks = triton.cdiv(n_tokens, bn)
        launches = []
        for stage in (1, 2, 3):
            steps = [s for s in plan.steps if s.stage == stage]
            if not steps:
                continue
            hidden, weight, bias = need_hidden and stage != 3, need_weight and stage != 2, need_bias and stage != 2
            tiles = [triton.cdiv(s.v_count, bv) for s in steps]
            flops = token_blocks * sum(tiles) * _dot_flops(bn, bv, dim, bd) * (1 + hidden + (weight or bias))
            constexprs = dict(config, **common, NEED_HIDDEN=hidden, SPLIT_HIDDEN=hidden and plan.hidden_split > 0,
                              NEED_WEIGHT=weight, NEED_BIAS=bias, VOCAB_ORDER=vocab_order,
                              DW_BY_ID=plan.layout == "full")
            name = _STAGE_NAMES[stage] + ("" if len(steps) == 1 else f" ({len(steps)} bands)")
            launches.append(Launch(name, _lce_backward_kernel, constexprs, (token_blocks * max(tiles),), warps,
                                   stages, flops, "backward", dict(plan=plan, stage=stage)))
        return launches
    config, warps, stages = _split(_tiles("deterministic", element, on_gpu))
    bn, bv, bd = config["BLOCK_N"], config["BLOCK_V"], config["BLOCK_D"]
    tile = _dot_flops(bn, bv, dim, bd)
    token_blocks, vocab_tiles = triton.cdiv(n_tokens, bn), triton.cdiv(vocab, bv)
    plan = plan_deterministic(vocab, n_tokens if hidden_rows is None else hidden_rows, dim,
                              band_rows(vocab, dim, element, accum_dtype, bv), bv, elem_bytes=_ELEMENT_BYTES[element],
                              need_hidden=need_hidden, need_weight=need_weight, full_buffer=accum_dtype == "fp32")
    launches = []
    if need_hidden:
        launches.append(Launch("grad_hidden", _lce_grad_hidden_kernel, dict(config, **common), (token_blocks,),
                               warps, stages, 2 * tile * token_blocks * vocab_tiles, "backward",
                               dict(plan=plan, stage=2)))
    if need_weight or need_bias:
        steps = [s for s in plan.steps if s.stage == 3]
        tiles = [triton.cdiv(s.v_count, bv) for s in steps]
        launches.append(Launch("grad_weight" + ("" if len(steps) == 1 else f" ({len(steps)} bands)"),
                               _lce_grad_weight_kernel,
                               dict(config, **common, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias),
                               (max(tiles),), warps, stages, (1 + need_weight) * tile * token_blocks * sum(tiles),
                               "backward", dict(plan=plan, stage=3)))
    return launches


# ------------------------------------------------------------------------------------------------ kernel audit

_POINTERS = {"slot_token_ptr": "*i64", "slot_row_ptr": "*i64", "slot_target_ptr": "*i64", "n_valid_ptr": "*i32"}
_FLOAT_ARGS = ("smoothing", "z_loss", "softcap", "filter_eps")


def audit_plans(quick: bool) -> list:
    """The kernels at Cut Cross-Entropy's benchmark shape (N=8192, D=2304, V=256000): bf16 with the default
    options and with bias + softcap + label smoothing, fp16, fp32; the full set adds fp32 with every option, a
    Llama-3 shape (N=16384, D=4096, V=128256) and the deterministic variant. Every stage of the backward's plan
    is a launch variant of its own (stage 2: dHidden only; stage 3: dWeight only)."""
    from .._audit import AuditPlan, KernelLaunch, signature_for

    cases = [(8192, 2304, 256000, "bf16", False, False), (8192, 2304, 256000, "bf16", True, False),
             (8192, 2304, 256000, "fp16", False, False), (8192, 2304, 256000, "fp32", False, False)]
    if not quick:
        cases += [(8192, 2304, 256000, "fp32", True, False), (16384, 4096, 128256, "bf16", False, False),
                  (8192, 2304, 256000, "bf16", False, True), (8192, 2304, 256000, "fp32", False, True)]
    plans = []
    for n, d, v, element, options, deterministic in cases:
        launches = [forward_launch(n, v, d, element, on_gpu=True, sms=H100_SMS, has_bias=options,
                                   has_softcap=options, has_smoothing=options)]
        launches += backward_launches(n, v, d, element, on_gpu=True, deterministic=deterministic, has_bias=options,
                                      has_softcap=options, filtering=element != "fp32", need_hidden=True,
                                      need_weight=True, need_bias=options)
        pointers = dict(_POINTERS, h_ptr=f"*{element}", w_ptr=f"*{element}", b_ptr=f"*{element}")
        audited = []
        for launch in launches:
            signature = signature_for(launch.kernel, launch.constexprs, pointers, _FLOAT_ARGS)
            # every pointer is a fresh allocation or a row of one with N % 4 == 0; sizes/strides here are
            # multiples of 16 except the split and band counts
            # (stage 3's bands shrink to any size: its v_count is not)
            unaligned = ("tiles_per_split", "n_splits", "v_start", "grad_scale_stride") + (
                ("v_count",) if launch.extra.get("stage") == 3 else ())
            aligned = tuple(a for a, t in signature.items()
                            if t.startswith("*") or (t == "i32" and a not in unaligned))
            audited.append(KernelLaunch(launch.name, launch.kernel, signature, launch.constexprs, launch.num_warps,
                                        launch.num_stages, launch.grid, launch.matmul_flops, phase=launch.phase,
                                        tensor_cores=True, pipelined=True, divisible_by_16=aligned))
        label = " ".join(filter(None, [f"N={n} D={d} V={v} {element}", "bias+softcap+smoothing" if options else "",
                                       "deterministic" if deterministic else ""]))
        # the in-place plan computes the logits of its last t rows twice: 4F + F t / V, plus its partial tiles
        # (masked rows, counted at 3 units: dz, dHidden, dWeight, the most a tile costs)
        plan = launches[-1].extra["plan"]
        # (the deterministic dWeight kernel's partial tiles: 2 units, dz and dWeight)
        extra = (plan.recomputed_rows + (2 if deterministic else 3) * plan.masked_rows) / v
        plans.append(AuditPlan("linear_ce", label, 2.0 * n * d * v, (5.0 if deterministic else 4.0) + extra,
                               tuple(audited)))
    return plans
