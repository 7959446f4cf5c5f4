"""Triton path of ``contrastive_loss`` (semantics in ``reference.py``): the launchers.

Kernels: ``triton_forward`` (row statistics), ``triton_backward`` (gradients: an atomic single-pass schedule and a
deterministic two-kernel one), tile helpers in ``triton_tiles``; which kernels run with which tiles and grids is
decided in ``triton_configs`` (shared with the autotuner and the sm_90 kernel audit, ``triton_audit``).

Forward: per-row loss and ``stats`` [5, B] (layout of ``torch_impl``: each lse as a shift and a log-sum).
``symmetric=True`` runs one pass that forms each logit tile once and keeps both row and column statistics
(``_symmetric_forward_kernel``): partial
(max, sum exp) pairs of S_c key-tile ranges per row and of S_r row-block ranges per column (S_r x S_c programs,
about one per SM), merged here by a logsumexp over the splits: 1F of matmul work, O((S_r + S_c)(B + M)) memory.

Backward: deterministic (dQ kernel + dK kernel, no atomics) when ``deterministic`` (the op passes
``torch.are_deterministic_algorithms_enabled()``); otherwise one FlashAttention-2-style pass with dQ accumulated
by float32 atomics. The upstream coefficients are multiplied by a power of two (``grad_scale``) so that
the gradient tile survives its cast to float16; the kernels divide it out of their float32 accumulators.

Precision: loads are upcast to float32 before any elementwise arithmetic; logits are accumulated in float32.
On a GPU, float16/bfloat16 tiles go to ``tl.dot`` in their own dtype. float32 inputs with D <= 256 are split here
once per call into float16 (hi, lo) parts of a power-of-two scaled copy (``split_f16``), which the kernels read
as dot operands: three float16 tensor-core products per dot (hi·lo + lo·hi + hi·hi), float32-class accuracy, no
operand splits in registers; the scales are folded into the temperature the kernels read and undone on the
outputs. float32 with D > 256 uses tf32x3 logits and FMA gradient dots. Under the interpreter every dot runs on
float32 values.
float64 inputs are not supported here (backend "torch"). The launchers make no host synchronisation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from .triton_audit import audit_plans  # noqa: F401  (read by python -m bench.kernel_audit)
from .torch_impl import STATS_ROWS, finite_shift, probability_factors
from .triton_configs import (Config, Configs, backward_launches, default_configs, forward_launches, run,
                             use_autotune)

# the gradient tile's largest entry is about 2**GRAD_SCALE_EXPONENT after scaling (float16 max: 65504)
GRAD_SCALE_EXPONENT = 13

__all__ = ["Config", "Configs", "default_configs", "contrastive_forward", "contrastive_backward", "grad_scale",
           "triton_rejects", "audit_plans"]


def triton_rejects(query: torch.Tensor) -> Optional[str]:
    if query.dtype == torch.float64:
        return "float64 inputs are not supported by the Triton kernels (use backend='torch')"
    return None


def grad_scale(magnitude: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S, 1/S): the power of two that brings max |magnitude| into [2**12, 2**13), as 0-d float32 tensors (no host
    sync). ``magnitude`` bounds each row's gradient-tile entries (the upstream coefficient; for pairwise times
    max(1/count, mean sigmoid)); every tile entry times S then stays below 2**14 < float16's max, and entries
    down to ~1e-12 of the largest survive the cast. Powers of two make the scaling exact."""
    _, exponent = torch.frexp(magnitude.detach().abs().amax().to(torch.float32))
    exponent = exponent.clamp(-100, 100)
    one = torch.ones((), dtype=torch.float32, device=magnitude.device)
    return torch.ldexp(one, GRAD_SCALE_EXPONENT - exponent), torch.ldexp(one, exponent - GRAD_SCALE_EXPONENT)


# split_f16 scales a tensor so that its largest entry lies in [2**(SPLIT_EXPONENT - 1), 2**SPLIT_EXPONENT): the
# hi part then stays below float16's max, and float16 products of two such parts (< 2**28) sum safely in float32
SPLIT_EXPONENT = 14


def split_f16(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(parts, scale): ``parts`` [rows, 2·P] float16 (P = D rounded up to a multiple of 8, so that the lo part
    starts 16-byte aligned; the padding is zero) with hi = parts[:, :D], lo = parts[:, P:P + D] and
    hi + lo = x * scale to ~2**-22 of max |x * scale| (hi rounds x * scale to float16, lo the remainder; entries
    too small for a normal lo lose nothing that matters relative to the largest); ``scale`` a 0-d float32 power
    of two (no host sync; max |x| is taken within [2**-31, 2**60], beyond which logits of such inputs are
    degenerate in float32 anyway). The dots of two such operands are then three exact float16 products summed in
    float32 (the kernels' "split_f16" mode)."""
    _, exponent = torch.frexp(x.detach().abs().amax().to(torch.float32))
    one = torch.ones((), dtype=torch.float32, device=x.device)
    scale = torch.ldexp(one, SPLIT_EXPONENT - exponent.clamp(-30, 60))
    scaled = x.detach().to(torch.float32) * scale
    hi = scaled.to(torch.float16)
    rows, dim = x.shape
    padded = -(-dim // 8) * 8
    parts = torch.zeros(rows, 2 * padded, dtype=torch.float16, device=x.device)
    parts[:, :dim] = hi
    parts[:, padded:padded + dim] = (scaled - hi.to(torch.float32)).to(torch.float16)
    return parts, scale


def _kernel_operands(query, keys, temperature, dot: str):
    """(q, k, temperature, q_scale, k_scale) as the kernels read them: in "split_f16" mode the float16 parts and
    the temperature times both scales (so that the kernels' logits are the unscaled ones, bitwise: powers of two),
    else the inputs and scales of 1."""
    if dot != "split_f16":
        one = torch.ones((), dtype=torch.float32, device=query.device)
        return query, keys, temperature, one, one
    q_parts, q_scale = split_f16(query)
    k_parts, k_scale = split_f16(keys)
    return q_parts, k_parts, temperature.detach().to(torch.float32) * (q_scale * k_scale), q_scale, k_scale


def _bucket(batch: int, num_keys: int, dim: int) -> tuple:
    return triton.next_power_of_2(batch), triton.next_power_of_2(num_keys), dim


def int32_key_ids(target: torch.Tensor, key_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Key ids as the kernels read them: dense int32 ranks from one sort (equal ids get equal ranks; no host
    sync), so the false-negative masks hold 32-bit ids in registers (what keeps the dK kernels free of spills
    when logq requires grad). Without key_ids the target stands in for the unused pointer."""
    if key_ids is None:
        return target
    ordered, order = torch.sort(key_ids)
    starts = torch.zeros(ordered.shape, dtype=torch.int32, device=key_ids.device)
    starts[1:] = (ordered[1:] != ordered[:-1]).to(torch.int32)
    ranks = torch.empty_like(starts)
    ranks[order] = torch.cumsum(starts, 0, dtype=torch.int32)
    return ranks


def _sm_count(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA device (a cached property, no synchronisation); None elsewhere."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _merge_lse(part_max: torch.Tensor, part_sum: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(shift, log-sum) over the split axis (0) of partial (max, sum exp(x - shift)) pairs, with the kernels'
    shift convention (0 once the max is +inf); a split that saw only masked entries (sum 0) contributes nothing.
    The lse is shift + log-sum, kept unrounded (torch_impl's layout)."""
    shift = finite_shift(part_max.amax(dim=0))
    return shift, torch.log((part_sum * torch.exp(finite_shift(part_max) - shift)).sum(dim=0))


def contrastive_forward(query, keys, target, temperature, key_ids, logq, mode, symmetric,
                        config: Optional[Config] = None,
                        splits: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [B] float32 and statistics [STATS_ROWS, B] float32 (layout of torch_impl). ``splits``:
    (S_r, S_c) of the symmetric forward's grid (default: from the device's SM count)."""
    if mode == "sigmoid":  # its own kernels: triton_sigmoid
        from .triton_sigmoid import sigmoid_forward
        return sigmoid_forward(query, keys, target, temperature, key_ids, logq)
    query, keys = query.contiguous(), keys.contiguous()
    batch, dim = query.shape
    num_keys = keys.shape[0]
    launches = forward_launches(batch, num_keys, dim, query.dtype, mode == "pairwise", symmetric,
                                key_ids is not None, logq is not None, config, splits, _sm_count(query.device))
    tune, bucket = use_autotune() and config is None, _bucket(batch, num_keys, dim)
    key_ids_arg = int32_key_ids(target, key_ids)
    q_arg, k_arg, temperature, _, _ = _kernel_operands(query, keys, temperature, launches[0].constexprs["DOT"])
    if not symmetric:
        loss = torch.empty(batch, dtype=torch.float32, device=query.device)
        stats = torch.zeros(STATS_ROWS, batch, dtype=torch.float32, device=query.device)
        run(launches[0], (q_arg, k_arg, target, key_ids_arg, logq if logq is not None else loss, temperature, loss,
                          stats, batch, num_keys, dim, q_arg.stride(0), k_arg.stride(0)), tune, bucket)
        return loss, stats
    # one pass: partial row statistics per key-tile range, partial column statistics per row-block range
    split_r, split_c = launches[0].grid
    row_part = torch.empty(3, split_c, batch, dtype=torch.float32, device=query.device)
    col_part = torch.empty(2, split_r, num_keys, dtype=torch.float32, device=query.device)
    run(launches[0], (q_arg, k_arg, target, key_ids_arg, logq if logq is not None else row_part, temperature,
                      row_part, col_part, batch, num_keys, dim, q_arg.stride(0), k_arg.stride(0)), tune, bucket)
    row_shift, row_log_sum = _merge_lse(row_part[0], row_part[1])
    col_shift, col_log_sum = _merge_lse(col_part[0], col_part[1])
    positive = row_part[2].sum(0)
    stats = torch.stack((row_shift, col_shift, positive, row_log_sum, col_log_sum))
    loss = (((row_shift - positive) + row_log_sum) + ((col_shift - positive) + col_log_sum)) / 2
    return loss, stats


def contrastive_backward(row_coef, query, keys, target, temperature, key_ids, logq, mode, symmetric, stats,
                         want_logq_grad: bool = False, configs: Optional[Configs] = None,
                         deterministic: Optional[bool] = None):
    """(dq, dk, dtemperature, dlogq or None) of sum_i row_coef_i * loss_i, recomputing logit tiles.

    ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``) picks the schedule without
    atomics."""
    if mode == "sigmoid":  # its own kernels (no atomics: deterministic either way)
        from .triton_sigmoid import sigmoid_backward
        return sigmoid_backward(row_coef, query, keys, target, temperature, key_ids, logq, want_logq_grad)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    query, keys = query.contiguous(), keys.contiguous()
    batch, dim = query.shape
    num_keys = keys.shape[0]
    pairwise = mode == "pairwise"
    # symmetric: each direction carries half of the row's upstream gradient
    row_coef = (row_coef * 0.5 if symmetric else row_coef).to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    magnitude = row_coef.abs() * torch.maximum(stats[1], stats[2]) if pairwise else row_coef
    scale, unscale = grad_scale(magnitude)
    scaled_coef = row_coef * scale
    # the statistics as the kernels read them: softmax coef * P = exp(s - m') * (coef * exp(-l)), the factor in
    # place of l (row 3; the column's, row 4, with the same coefficient: symmetric column j's is row j's)
    kernel_stats = stats
    if not pairwise:
        kernel_stats = stats.clone()
        kernel_stats[0], kernel_stats[3] = probability_factors(stats[0], stats[3], scaled_coef)
        if symmetric:
            kernel_stats[1], kernel_stats[4] = probability_factors(stats[1], stats[4], scaled_coef)
    launches = backward_launches(batch, num_keys, dim, query.dtype, pairwise, symmetric, key_ids is not None,
                                 logq is not None, want_logq_grad, deterministic, configs)
    tune, bucket = use_autotune() and configs is None, _bucket(batch, num_keys, dim)
    inv_temperature = 1.0 / temperature.to(torch.float32)
    dk = torch.empty_like(keys)
    # column sums of G * S (added per tile by the atomic kernel)
    dlogq = torch.zeros(num_keys, dtype=torch.float32, device=query.device) if want_logq_grad else None
    # split_f16 operands: the kernels' dQ comes out times 1/q_scale, dK times 1/k_scale, q . dq times q_scale
    q_arg, k_arg, kernel_temperature, q_scale, k_scale = _kernel_operands(query, keys, temperature,
                                                                          launches[0].constexprs["DOT"])
    common = (q_arg, k_arg, target, int32_key_ids(target, key_ids), logq if logq is not None else row_coef,
              kernel_temperature, kernel_stats, scaled_coef)
    sizes = (batch, num_keys, dim, q_arg.stride(0), k_arg.stride(0))
    keys_launch = launches[-1]
    if keys_launch.constexprs["ATOMIC_DQ"]:
        dq_acc = torch.zeros(batch, keys_launch.grid[1] * keys_launch.constexprs["BLOCK_DV"], dtype=torch.float32,
                             device=query.device)
        run(keys_launch, common + (unscale * k_scale, dk, dlogq if dlogq is not None else dq_acc, dq_acc) + sizes,
            tune, bucket)
        dq32 = dq_acc[:, :dim] * (unscale * inv_temperature / k_scale)
        dq = dq32.to(query.dtype)
        dtemperature = -(query.to(torch.float32) * dq32).sum() * inv_temperature
    else:
        dq = torch.empty_like(query)
        dot_partial = torch.empty(launches[0].grid[1], batch, dtype=torch.float32, device=query.device)
        run(launches[0], common + (unscale * q_scale, dq, dot_partial) + sizes, tune, bucket)
        run(keys_launch, common + (unscale * k_scale, dk, dlogq if dlogq is not None else row_coef, row_coef)
            + sizes, tune, bucket)
        dtemperature = -dot_partial.sum() * (inv_temperature / q_scale)
    if dlogq is not None:
        dlogq = -dlogq * unscale
    return dq, dk, dtemperature, dlogq
