"""Triton kernels for the fused linear + cross-entropy op, and their launchers.

Forward: one program per block of BLOCK_N tokens walks the vocabulary in tiles of BLOCK_V; each logits tile is
built from BLOCK_D-wide ``tl.dot`` steps with fp32 accumulation, softcapped in registers, and folded into an
online log-sum-exp. The target logit is picked out of the tile it falls in (the same fp32 value the lse saw),
and the row sum of logits is tracked for label smoothing. Only per-token statistics reach memory: the loss, the
row max and log-sum-exp relative to it (kept apart: their fp32 sum, the lse, is too coarse to recover p_t - 1
for a peaked softmax in the backward).

Backward recomputes the tiles. Two kernels, both deterministic (no atomics):
  - grad_hidden: token-parallel. A program owns BLOCK_N token rows of an fp32 dHidden buffer and adds
    dz @ W_tile into them for every vocabulary tile.
  - grad_weight: vocabulary-parallel. A program owns BLOCK_V rows of the fp32 dWeight buffer (the gradient
    itself, no other [V, D] temporary) and adds dz^T @ X over every token block, in token order.

Ignored tokens are removed before compute without a host sync: tokens are reordered so the valid ones come
first (a stable device-side argsort) and the valid count is read by the kernels from device memory; blocks past
it exit at once, and the weight-gradient loop stops there.

Loads are upcast to fp32 before any arithmetic when the interpreter runs the kernels (its bf16 arithmetic and
bf16 ``tl.dot`` are wrong) and for fp32 inputs (which then use exact fp32 dots, not TF32). fp16/bf16 on a GPU
feed the tensor cores in their own dtype with fp32 accumulation.

A fixed block configuration is used by default; ``KARMA_AUTOTUNE=1`` (read at import) autotunes instead.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backend import interpreter_active
from .torch_impl import cast_grads_like

AUTOTUNE = os.environ.get("KARMA_AUTOTUNE") == "1"


def _block_config(device: torch.device, kernel: str) -> dict:
    """Fixed launch configuration of ``kernel`` ("forward", "grad_hidden", "grad_weight") on ``device``."""
    if device.type != "cuda":
        # interpreter: a program instance costs ~1 ms, blocks are numpy arrays; fewer, mid-sized blocks
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=32, num_warps=4)
    if kernel == "grad_weight":
        # each token block re-reads and re-writes the program's fp32 dWeight rows: larger token blocks, fewer passes
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=2)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)


_AUTOTUNE_CONFIGS = [
    triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd), num_warps=w, num_stages=s)
    for bn, bv, bd, w, s in [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
                             (128, 64, 64, 4, 4), (32, 128, 128, 4, 3)]
]


@triton.jit
def _tanh(x):
    # from exp rather than libdevice (not available under the interpreter); saturates cleanly for large |x|
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Logits of a [BLOCK_N, BLOCK_V] tile in fp32, softcapped; also returns tanh(y / softcap) (or y)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(h_ptr + rows[:, None] * stride_h + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v.to(tl.int64)[:, None] * stride_w + offs_d[None, :],
                    mask=v_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    tanh_val = acc
    if HAS_SOFTCAP:
        tanh_val = _tanh(acc / softcap)
        acc = softcap * tanh_val
    return acc, tanh_val


@triton.jit
def _grad_logits(z, tanh_val, row_max, log_sum, target, offs_v, v_mask, row_mask, grad_scale, z_factor, smoothing, V,
                 HAS_SOFTCAP: tl.constexpr):
    """d(sum_n g_n loss_n)/dy for a tile: g ((1 + 2 z_loss lse) p - (1 - eps) [j == t] - eps / V), times the
    softcap derivative 1 - tanh^2. p = exp((z - max) - log_sum): the lse rounded to fp32 would lose p_t - 1
    when p_t ~ 1; and the one-hot is subtracted before scaling by g for the same reason."""
    probs = tl.exp((z - row_max[:, None]) - log_sum[:, None])
    is_target = offs_v[None, :] == target[:, None]
    dz = probs * z_factor[:, None] - tl.where(is_target, 1.0 - smoothing, 0.0) - smoothing / V
    dz = dz * grad_scale[:, None]
    if HAS_SOFTCAP:
        dz = dz * (1.0 - tanh_val * tanh_val)
    return tl.where(row_mask[:, None] & v_mask[None, :], dz, 0.0)


@triton.jit
def _add_dot_into(out_ptrs, out_mask, lhs, rhs_ptrs, rhs_mask, UPCAST: tl.constexpr):
    """out += lhs @ rhs, fp32 read-modify-write of a block that only this program writes."""
    rhs = tl.load(rhs_ptrs, mask=rhs_mask, other=0.0)
    acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
    if UPCAST:
        acc = tl.dot(lhs, rhs.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(lhs.to(rhs.dtype), rhs, acc)
    tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _token_block(n_valid_ptr, BLOCK_N: tl.constexpr):
    """This program's block of token slots: offsets, mask, and whether it holds any (slots past the valid count
    are ignored tokens; their programs skip all work)."""
    n_valid = tl.load(n_valid_ptr)
    start = tl.program_id(0) * BLOCK_N
    offs_n = start + tl.arange(0, BLOCK_N)
    return offs_n, offs_n < n_valid, start < n_valid


@triton.jit
def _lce_forward_kernel(h_ptr, w_ptr, b_ptr, slot_token_ptr, slot_row_ptr, slot_target_ptr, n_valid_ptr,
                        loss_ptr, max_ptr, log_sum_ptr, V, D, stride_h, stride_w, smoothing, z_loss, softcap,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                        UPCAST: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_n, row_mask, active = _token_block(n_valid_ptr, BLOCK_N)
    if active:
        rows = tl.load(slot_row_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
        target = tl.load(slot_target_ptr + offs_n, mask=row_mask, other=0)
        row_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
        target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
        logit_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            z, tanh_val = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w,
                                       softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
            target_logit += tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), axis=1)
            if HAS_SMOOTHING:
                logit_sum += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
            z = tl.where(v_mask[None, :], z, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(z, axis=1))
            sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            row_max = new_max
        log_sum = tl.log(sum_exp)
        lse = row_max + log_sum
        # lse - (1 - eps) z_t - eps mean(z), arranged so that no two large numbers cancel when p_t ~ 1
        loss = log_sum + (1.0 - smoothing) * (row_max - target_logit) + z_loss * lse * lse
        if HAS_SMOOTHING:
            loss += smoothing * (row_max - logit_sum / V)
        token = tl.load(slot_token_ptr + offs_n, mask=row_mask, other=0)
        tl.store(loss_ptr + token, loss, mask=row_mask)
        tl.store(max_ptr + token, row_max, mask=row_mask)
        tl.store(log_sum_ptr + token, log_sum, mask=row_mask)


@triton.jit
def _load_grad_terms(offs_n, row_mask, slot_token_ptr, slot_row_ptr, slot_target_ptr, grad_scale_ptr,
                     grad_scale_stride, max_ptr, log_sum_ptr, z_loss):
    rows = tl.load(slot_row_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    target = tl.load(slot_target_ptr + offs_n, mask=row_mask, other=0)
    token = tl.load(slot_token_ptr + offs_n, mask=row_mask, other=0)
    g = tl.load(grad_scale_ptr + token * grad_scale_stride, mask=row_mask, other=0.0).to(tl.float32)
    row_max = tl.load(max_ptr + token, mask=row_mask, other=0.0)
    log_sum = tl.load(log_sum_ptr + token, mask=row_mask, other=0.0)
    z_factor = 1.0 + 2.0 * z_loss * (row_max + log_sum)
    return rows, target, row_max, log_sum, g, z_factor


@triton.jit
def _lce_grad_hidden_kernel(h_ptr, w_ptr, b_ptr, slot_token_ptr, slot_row_ptr, slot_target_ptr, n_valid_ptr,
                            grad_scale_ptr, grad_scale_stride, max_ptr, log_sum_ptr, grad_h_ptr,
                            V, D, stride_h, stride_w, stride_gh, smoothing, z_loss, softcap,
                            HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_n, row_mask, active = _token_block(n_valid_ptr, BLOCK_N)
    if active:
        rows, target, row_max, log_sum, grad_scale, z_factor = _load_grad_terms(
            offs_n, row_mask, slot_token_ptr, slot_row_ptr, slot_target_ptr, grad_scale_ptr, grad_scale_stride,
            max_ptr, log_sum_ptr, z_loss)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            z, tanh_val = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w,
                                       softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
            dz = _grad_logits(z, tanh_val, row_max, log_sum, target, offs_v, v_mask, row_mask, grad_scale, z_factor,
                              smoothing, V, HAS_SOFTCAP)
            # this program owns these token rows of the fp32 buffer: plain read-modify-write, deterministic
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                _add_dot_into(grad_h_ptr + rows[:, None] * stride_gh + offs_d[None, :],
                              row_mask[:, None] & d_mask[None, :], dz,
                              w_ptr + offs_v.to(tl.int64)[:, None] * stride_w + offs_d[None, :],
                              v_mask[:, None] & d_mask[None, :], UPCAST)


@triton.jit
def _lce_grad_weight_kernel(h_ptr, w_ptr, b_ptr, slot_token_ptr, slot_row_ptr, slot_target_ptr, n_valid_ptr,
                            grad_scale_ptr, grad_scale_stride, max_ptr, log_sum_ptr, grad_w_ptr, grad_b_ptr,
                            V, D, stride_h, stride_w, stride_gw, smoothing, z_loss, softcap,
                            HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                            NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    n_valid = tl.load(n_valid_ptr)
    bias_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, n_valid, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_mask = offs_n < n_valid
        rows, target, row_max, log_sum, grad_scale, z_factor = _load_grad_terms(
            offs_n, row_mask, slot_token_ptr, slot_row_ptr, slot_target_ptr, grad_scale_ptr, grad_scale_stride,
            max_ptr, log_sum_ptr, z_loss)
        z, tanh_val = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w,
                                   softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
        dz = _grad_logits(z, tanh_val, row_max, log_sum, target, offs_v, v_mask, row_mask, grad_scale, z_factor,
                          smoothing, V, HAS_SOFTCAP)
        if NEED_BIAS:
            bias_acc += tl.sum(dz, axis=0)
        if NEED_WEIGHT:
            # this program owns these vocabulary rows of the fp32 gradient: deterministic accumulation
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                _add_dot_into(grad_w_ptr + offs_v.to(tl.int64)[:, None] * stride_gw + offs_d[None, :],
                              v_mask[:, None] & d_mask[None, :], tl.trans(dz),
                              h_ptr + rows[:, None] * stride_h + offs_d[None, :],
                              row_mask[:, None] & d_mask[None, :], UPCAST)
    if NEED_BIAS:
        tl.store(grad_b_ptr + offs_v, bias_acc, mask=v_mask)


if AUTOTUNE:
    _KEY = ["V", "D"]
    _lce_forward_kernel = triton.autotune(_AUTOTUNE_CONFIGS, key=_KEY)(_lce_forward_kernel)
    _lce_grad_hidden_kernel = triton.autotune(_AUTOTUNE_CONFIGS, key=_KEY,
                                              reset_to_zero=["grad_h_ptr"])(_lce_grad_hidden_kernel)
    _lce_grad_weight_kernel = triton.autotune(_AUTOTUNE_CONFIGS, key=_KEY,
                                              reset_to_zero=["grad_w_ptr"])(_lce_grad_weight_kernel)


def unsupported_reason(hidden: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """Why these inputs cannot take the Triton path (None when they can)."""
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        return "float64 inputs are not supported by the Triton kernels (use backend='torch')"
    if hidden.stride(-1) != 1 or weight.stride(-1) != 1:
        return "hidden and weight need a contiguous last dimension"
    return None


def _upcast(hidden: torch.Tensor) -> bool:
    return interpreter_active() or hidden.device.type != "cuda" or hidden.dtype == torch.float32


def _launch_config(device: torch.device, kernel: str):
    return {} if AUTOTUNE else _block_config(device, kernel)


def _grid_over(count: int, block_key: str, config: dict):
    if AUTOTUNE:
        return lambda meta: (max(1, triton.cdiv(count, meta[block_key])),)
    return (max(1, triton.cdiv(count, config[block_key])),)


def token_slots(target: torch.Tensor, row_index: Optional[torch.Tensor], ignore_index: int):
    """Valid tokens first, in their order, without a host sync: (slot_token, slot_row, slot_target, n_valid)."""
    valid = target != ignore_index
    slot_token = torch.argsort((~valid).to(torch.int8), stable=True)
    slot_row = slot_token if row_index is None else row_index.index_select(0, slot_token)
    slot_target = target.index_select(0, slot_token)
    n_valid = valid.sum(dtype=torch.int32).reshape(1)
    return slot_token, slot_row.contiguous(), slot_target.contiguous(), n_valid


def forward(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
            row_index: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
            ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
            softcap: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [N] and softmax statistics [2, N] = (row max, log sum exp(z - max)), so lse = their sum;
    fp32, 0 at ignored tokens. hidden [R, D], weight [V, D], target [N]. The backward takes the statistics."""
    n_tokens = target.numel()
    vocab, dim = weight.shape
    loss = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)
    stats = torch.zeros((2, n_tokens), dtype=torch.float32, device=hidden.device)
    if n_tokens == 0:
        return loss, stats
    slot_token, slot_row, slot_target, n_valid = token_slots(target, row_index, ignore_index)
    config = _launch_config(hidden.device, "forward")
    _lce_forward_kernel[_grid_over(n_tokens, "BLOCK_N", config)](
        hidden, weight, bias if bias is not None else hidden, slot_token, slot_row, slot_target, n_valid,
        loss, stats[0], stats[1], vocab, dim, hidden.stride(0), weight.stride(0),
        float(label_smoothing), float(z_loss), float(softcap or 1.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0,
        UPCAST=_upcast(hidden), **config)
    return loss, stats


def backward(grad_scale: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
             stats: torch.Tensor, *, row_index: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
             ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
             softcap: Optional[float] = None, need_grad_hidden: bool = True, need_grad_weight: bool = True,
             need_grad_bias: bool = True):
    """Gradients of sum_n grad_scale_n * loss_n. ``grad_scale`` is [N] or a 0-d tensor (broadcast); ``stats``
    is the forward's [2, N] softmax statistics."""
    n_tokens = target.numel()
    vocab, dim = weight.shape
    device = hidden.device
    need_grad_bias = need_grad_bias and bias is not None
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need_grad_hidden else None
    grad_weight = torch.zeros((vocab, dim), dtype=torch.float32, device=device) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_grad_bias else None
    if n_tokens and (need_grad_hidden or need_grad_weight or need_grad_bias):
        grad_scale = grad_scale.to(torch.float32)
        grad_scale_stride = 0 if grad_scale.dim() == 0 else grad_scale.stride(0)
        slot_token, slot_row, slot_target, n_valid = token_slots(target, row_index, ignore_index)
        common = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=_upcast(hidden))
        scalars = (float(label_smoothing), float(z_loss), float(softcap or 1.0))
        bias_arg = bias if bias is not None else hidden
        stats = stats.contiguous()
        if need_grad_hidden:
            config = _launch_config(device, "grad_hidden")
            _lce_grad_hidden_kernel[_grid_over(n_tokens, "BLOCK_N", config)](
                hidden, weight, bias_arg, slot_token, slot_row, slot_target, n_valid, grad_scale,
                grad_scale_stride, stats[0], stats[1], grad_hidden, vocab, dim, hidden.stride(0), weight.stride(0),
                grad_hidden.stride(0), *scalars, **common, **config)
        if need_grad_weight or need_grad_bias:
            config = _launch_config(device, "grad_weight")
            _lce_grad_weight_kernel[_grid_over(vocab, "BLOCK_V", config)](
                hidden, weight, bias_arg, slot_token, slot_row, slot_target, n_valid, grad_scale,
                grad_scale_stride, stats[0], stats[1], grad_weight if grad_weight is not None else hidden,
                grad_bias if grad_bias is not None else hidden, vocab, dim, hidden.stride(0), weight.stride(0),
                dim, *scalars, NEED_WEIGHT=need_grad_weight, NEED_BIAS=need_grad_bias, **common, **config)
    return cast_grads_like((grad_hidden, grad_weight, grad_bias), (hidden, weight, bias))


def compile_for_gpu(dtype: torch.dtype = torch.bfloat16, arch: int = 90) -> dict:
    """Compile the three kernels for an NVIDIA target without a GPU (Triton's bundled ptxas), so CI on a
    CPU-only machine still sees GPU compile errors. Needs TRITON_INTERPRET unset when this module was imported.
    Returns {kernel name: bytes of shared memory it needs}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    element = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    pointer_types = {"h_ptr": f"*{element}", "w_ptr": f"*{element}", "b_ptr": f"*{element}",
                     "slot_token_ptr": "*i64", "slot_row_ptr": "*i64", "slot_target_ptr": "*i64",
                     "n_valid_ptr": "*i32"}
    float_args = ("smoothing", "z_loss", "softcap")
    flags = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SMOOTHING=True, NEED_WEIGHT=True, NEED_BIAS=True,
                 UPCAST=dtype == torch.float32)
    shared = {}
    for name, kernel in (("forward", _lce_forward_kernel), ("grad_hidden", _lce_grad_hidden_kernel),
                         ("grad_weight", _lce_grad_weight_kernel)):
        if not isinstance(kernel, triton.JITFunction):
            raise RuntimeError("compile_for_gpu needs the compiled kernels: import with TRITON_INTERPRET unset "
                               "and KARMA_AUTOTUNE unset")
        config = _block_config(torch.device("cuda"), name)
        launch = {k: config.pop(k) for k in ("num_warps", "num_stages")}
        signature, constants = {}, {}
        for index, arg in enumerate(kernel.arg_names):
            if arg in config or arg in flags:
                signature[arg] = "constexpr"
                constants[(index,)] = config.get(arg, flags.get(arg))
            elif arg.endswith("_ptr"):
                signature[arg] = pointer_types.get(arg, "*fp32")
            else:
                signature[arg] = "fp32" if arg in float_args else "i32"
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32),
                                  options=launch)
        shared[name] = compiled.metadata.shared
    return shared
