"""Launchers of the fused linear + cross-entropy Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

Kernels: ``triton_forward.py`` (2-D forward grid, split partials merged deterministically), ``triton_backward.py``
(one-pass filtered backward, and the deterministic pair), ``triton_common.py`` (shared tile math, the
power-of-two scaled cast of gradient tiles). Tiles, grids and the matmul work of each launch come from
``triton_configs.py``, which the kernel audit reads too (``audit_plans``).

Ignored tokens are removed before compute without a host sync: tokens are reordered so the valid ones come
first (a stable device-side argsort) and the valid count is read by the kernels from device memory; blocks past
it exit at once.

Options of the backward:
  filter_eps    tiles whose |dz| (the logits gradient before the upstream gradient) is below it everywhere are
                skipped; 0 = exact. The op's "auto" resolves it per dtype (``op.resolve_filter_eps``).
  accum_dtype   None: fp16/bf16 gradients are accumulated in fp32 inside the two gradient outputs themselves
                (dWeight's not-yet-written rows, dHidden's own rows; ``backward_plan.py``: memory = the two
                gradients + a 16-row fp32 tail; extra work F t / V, t = N + 2 band rows); "fp32": one fp32
                [V, D] buffer, cast at the end.
                ``vocab_order=True`` keeps fp32 bands of <= 16 MiB and an fp32 dHidden of their own.
  deterministic the two-kernel variant without atomics (taken when torch.are_deterministic_algorithms_enabled());
                its fp32 sums also live in the fp16/bf16 dWeight output (``backward_plan.plan_deterministic``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._backend import interpreter_active
from .backward_plan import ALIGN_BYTES, fp32_view_offset
from .torch_impl import cast_grads_like
from .triton_configs import audit_plans, backward_launches, forward_launch  # noqa: F401  (audit_plans: the audit)
from .triton_forward import merge_partials

_ELEMENT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _on_gpu(hidden: torch.Tensor) -> bool:
    return hidden.device.type == "cuda" and not interpreter_active()


def _sms(device: torch.device) -> int:
    if device.type != "cuda" or interpreter_active():
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def unsupported_reason(hidden: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """Why these inputs cannot take the Triton path (None when they can)."""
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        return "float64 inputs are not supported by the Triton kernels (use backend='torch')"
    if hidden.stride(-1) != 1 or weight.stride(-1) != 1:
        return "hidden and weight need a contiguous last dimension"
    return None


def token_slots(target: torch.Tensor, row_index: Optional[torch.Tensor], ignore_index: int):
    """Valid tokens first, in their order, without a host sync: (slot_token, slot_row, slot_target, n_valid)."""
    valid = target != ignore_index
    slot_token = torch.argsort((~valid).to(torch.int8), stable=True)
    slot_row = slot_token if row_index is None else row_index.index_select(0, slot_token)
    slot_target = target.index_select(0, slot_token)
    n_valid = valid.sum(dtype=torch.int32).reshape(1)
    return slot_token, slot_row.contiguous(), slot_target.contiguous(), n_valid


def _vocab_order(hidden, weight, bias, row_index) -> torch.Tensor:
    """Classes by descending mean logit over the batch's hidden rows (the logit of the mean hidden state)."""
    rows = hidden if row_index is None else hidden.index_select(0, row_index)
    mean_logit = torch.mv(weight, rows.float().mean(0).to(weight.dtype)).float()   # no fp32 copy of W
    if bias is not None:
        mean_logit = mean_logit + bias.float()
    return torch.argsort(mean_logit, descending=True)


def forward(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
            row_index: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
            ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
            softcap: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [N] and softmax statistics [2, N] = (row max, log sum exp(z - max)), so lse = their sum;
    fp32, 0 at ignored tokens. hidden [R, D], weight [V, D], target [N]. The backward takes the statistics."""
    n_tokens = target.numel()
    vocab, dim = weight.shape
    if n_tokens == 0:
        return (torch.zeros(0, dtype=torch.float32, device=hidden.device),
                torch.zeros((2, 0), dtype=torch.float32, device=hidden.device))
    slot_token, slot_row, slot_target, n_valid = token_slots(target, row_index, ignore_index)
    launch = forward_launch(n_tokens, vocab, dim, _ELEMENT[hidden.dtype], on_gpu=_on_gpu(hidden),
                            sms=_sms(hidden.device), has_bias=bias is not None, has_softcap=softcap is not None,
                            has_smoothing=label_smoothing > 0)
    splits = launch.extra["splits"]
    part = torch.zeros((4, splits, n_tokens), dtype=torch.float32, device=hidden.device)
    launch.kernel[launch.grid](
        hidden, weight, bias if bias is not None else hidden, slot_token, slot_row, slot_target, n_valid, part,
        n_tokens, vocab, dim, hidden.stride(0), weight.stride(0), launch.extra["tiles_per_split"], splits,
        float(softcap or 1.0), **launch.options())
    return merge_partials(part, target != ignore_index, vocab, label_smoothing, z_loss)


def backward(grad_scale: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
             stats: torch.Tensor, *, row_index: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
             ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
             softcap: Optional[float] = None, need_grad_hidden: bool = True, need_grad_weight: bool = True,
             need_grad_bias: bool = True, filter_eps: float = 0.0, accum_dtype: Optional[str] = None,
             vocab_order: bool = False, deterministic: Optional[bool] = None):
    """Gradients of sum_n grad_scale_n * loss_n. ``grad_scale`` is [N] or a 0-d tensor (broadcast); ``stats``
    is the forward's [2, N] softmax statistics. ``deterministic=None`` follows
    ``torch.are_deterministic_algorithms_enabled()``. ``vocab_order``: tiles walk the classes by descending mean
    logit over the batch (one GEMV and a sort), so that filtered tiles cluster (one-pass backward only)."""
    n_tokens = target.numel()
    vocab, dim = weight.shape
    device = hidden.device
    need_grad_bias = need_grad_bias and bias is not None
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if not n_tokens or not (need_grad_hidden or need_grad_weight or need_grad_bias):
        zeros = [torch.zeros_like(x) if need else None
                 for x, need in ((hidden, need_grad_hidden), (weight, need_grad_weight), (bias, need_grad_bias))]
        return tuple(zeros)
    launches = backward_launches(
        n_tokens, vocab, dim, _ELEMENT[hidden.dtype], on_gpu=_on_gpu(hidden), deterministic=deterministic,
        has_bias=bias is not None, has_softcap=softcap is not None, filtering=filter_eps > 0,
        need_hidden=need_grad_hidden, need_weight=need_grad_weight, need_bias=need_grad_bias, accum_dtype=accum_dtype,
        vocab_order=vocab_order and not deterministic, hidden_rows=hidden.shape[0])
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_grad_bias else None
    grad_scale = grad_scale.to(torch.float32)
    slots = token_slots(target, row_index, ignore_index)
    stats = stats.contiguous()
    head = (hidden, weight, bias if bias is not None else hidden) + slots + (
        grad_scale, 0 if grad_scale.dim() == 0 else grad_scale.stride(0), stats[0], stats[1])
    scalars = (float(label_smoothing), float(z_loss), float(softcap or 1.0), float(filter_eps))
    run = run_deterministic_plan if deterministic else run_plan
    grad_hidden, grad_weight = run(launches, head, scalars, grad_bias, n_tokens, hidden, weight, bias, row_index,
                                   need_grad_hidden, need_grad_weight)
    return cast_grads_like((grad_hidden, grad_weight, grad_bias), (hidden, weight, bias))


def _fp32_view(grad_weight: torch.Tensor, row: int, numel: int) -> torch.Tensor:
    """A flat fp32 view of ``numel`` values in the fp16/bf16 gradient from its row ``row`` on (16-byte aligned)."""
    offset = fp32_view_offset(row, grad_weight.shape[1], grad_weight.element_size())
    view = grad_weight.view(-1)[offset:offset + 2 * numel].view(torch.float32)
    assert view.data_ptr() % ALIGN_BYTES == 0, "fp32 view inside the gradient is not 16-byte aligned"
    return view


class _HiddenSums:
    """Where dHidden's fp32 sums live: its own fp32 buffer, or (in-place plan) columns [0, split) in the fp16/bf16
    dHidden output's memory (a row of it holds D / 2 fp32 values) and columns [split, D) in the dWeight output's
    rows ``plan.hidden_acc_row`` onwards."""

    def __init__(self, plan, grad_weight: torch.Tensor, hidden: torch.Tensor):
        rows, dim = hidden.shape
        self.split, self.out, self.second = plan.hidden_split, None, None
        self.in_place = plan.hidden_acc_row is not None
        if not self.in_place:
            self.first = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
            return
        if self.split:
            self.out = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            self.first = self.out.view(torch.float32)[:, :self.split]
        in_weight = _fp32_view(grad_weight, plan.hidden_acc_row, rows * (dim - self.split)).zero_()
        if self.split:
            self.second = in_weight.view(rows, dim - self.split)
        else:
            self.first = in_weight.view(rows, dim)

    def kernel_args(self, unused: torch.Tensor, dim: int) -> tuple:
        second = self.second if self.second is not None else unused
        return (self.first, second), (self.first.stride(0), second.stride(0) if self.second is not None else 0,
                                      self.split or dim)

    def finish(self, grad_weight: torch.Tensor, plan, dtype: torch.dtype) -> torch.Tensor:
        """dHidden complete: cast into its output; the dWeight rows that held sums are free afterwards."""
        if not self.in_place:
            return self.first
        if not self.split:
            return self.first.to(dtype)   # the one new gradient-sized allocation
        # columns [0, split) are cast within their own output rows: a chunk of rows is first cast into the free
        # band rows of the dWeight output, then written back with columns [split, D)
        dim = grad_weight.shape[1]
        spare = grad_weight.view(-1)[plan.spare_row * dim:(plan.spare_row + plan.spare_rows) * dim]
        chunk = max(1, spare.numel() // self.split)
        for r0 in range(0, self.out.shape[0], chunk):
            rows = slice(r0, r0 + chunk)
            first = self.first[rows]
            staged = spare[:first.numel()].view(first.shape)
            staged.copy_(first)
            self.out[rows, :self.split].copy_(staged)
            self.out[rows, self.split:].copy_(self.second[rows])
        return self.out


def _weight_outputs(plan, weight: torch.Tensor, need_weight: bool):
    """(dWeight, its separate fp32 buffer or None) as the plan lays them out."""
    vocab, dim = weight.shape
    if not need_weight:
        return None, None
    if plan.layout == "full":        # fp32 gradient, or one full fp32 buffer
        buffer = torch.zeros((vocab, dim), dtype=torch.float32, device=weight.device)
        return buffer, buffer
    grad_weight = torch.empty((vocab, dim), dtype=weight.dtype, device=weight.device)
    buffer = (torch.empty((plan.separate_rows, dim), dtype=torch.float32, device=weight.device)
              if plan.separate_rows else None)
    return grad_weight, buffer


def _band_sums(plan, step, grad_weight: torch.Tensor, buffer: Optional[torch.Tensor]) -> torch.Tensor:
    """Zeroed fp32 sums of a dWeight step: the full buffer, a view of unwritten gradient rows, or the buffer."""
    if plan.layout == "full":
        return buffer
    dim = grad_weight.shape[1]
    if step.scratch_row is not None:
        return _fp32_view(grad_weight, step.scratch_row, step.v_count * dim).view(step.v_count, dim).zero_()
    return buffer[:step.v_count].zero_()


def _cast_band(plan, step, sums: torch.Tensor, grad_weight: torch.Tensor, order: Optional[torch.Tensor]) -> None:
    """A step's fp32 sums into its rows of the fp16/bf16 gradient (nothing to do for the full buffer)."""
    if plan.layout == "full":
        return
    rows = slice(step.v_start, step.v_start + step.v_count)
    if order is None:
        grad_weight[rows].copy_(sums)
    else:
        grad_weight.index_copy_(0, order[rows], sums.to(grad_weight.dtype))


def run_deterministic_plan(launches, head, scalars, grad_bias, n_tokens: int, hidden, weight, bias, row_index,
                           need_hidden: bool, need_weight: bool):
    """The deterministic pair (``backward_plan.plan_deterministic``): dHidden's kernel first, its fp32 sums in
    the dWeight output's first rows when they fit (cast into the dHidden output at once), then dWeight's kernel
    band by band with each band's sums in rows not yet written. Returns (dHidden, dWeight)."""
    by_stage = {launch.extra["stage"]: launch for launch in launches}
    plan = launches[0].extra["plan"]
    vocab, dim = weight.shape
    grad_weight, buffer = _weight_outputs(plan, weight, need_weight)
    unused = hidden  # pointer placeholder for an output that is not asked for
    grad_hidden = None
    if need_hidden:
        launch = by_stage[2]
        sums_h = _HiddenSums(plan, grad_weight, hidden)    # no split: all of dHidden's sums in one place
        launch.kernel[launch.grid](*head, sums_h.first, vocab, dim, hidden.stride(0), weight.stride(0),
                                   sums_h.first.stride(0), *scalars, **launch.options())
        grad_hidden = sums_h.finish(grad_weight, plan, hidden.dtype)   # in place: the rows are free again
    if 3 in by_stage:
        launch = by_stage[3]
        for step in (s for s in plan.steps if s.stage == 3):
            sums = _band_sums(plan, step, grad_weight, buffer) if need_weight else unused
            grid = (-(-step.v_count // launch.constexprs["BLOCK_V"]),)
            launch.kernel[grid](*head, sums, grad_bias if grad_bias is not None else unused, vocab, step.v_start,
                                step.v_count, dim, hidden.stride(0), weight.stride(0), dim, *scalars,
                                **launch.options())
            if need_weight:
                _cast_band(plan, step, sums, grad_weight, None)
    return grad_hidden, grad_weight


def run_plan(launches, head, scalars, grad_bias, n_tokens: int, hidden, weight, bias, row_index,
             need_hidden: bool, need_weight: bool):
    """Walks the one-pass backward's plan (``backward_plan``): allocates the gradients, keeps the fp32 sums
    where the plan says (inside the fp16/bf16 dWeight output for the "in_place" layout), launches each step and
    casts each band into its rows. Returns (dHidden, dWeight); dHidden is fp32 unless the plan cast it already."""
    plan = launches[0].extra["plan"]
    by_stage = {launch.extra["stage"]: launch for launch in launches}
    vocab, dim = weight.shape
    grad_hidden = None
    grad_weight, buffer = _weight_outputs(plan, weight, need_weight)
    sums_h = _HiddenSums(plan, grad_weight, hidden) if need_hidden else None
    order = _vocab_order(hidden, weight, bias, row_index) if by_stage[1].constexprs["VOCAB_ORDER"] else None
    unused = hidden  # pointer placeholder for an output that is not asked for
    for step in plan.steps:
        launch = by_stage[step.stage]
        if step.stage == 3 and grad_hidden is None and sums_h is not None:
            grad_hidden = sums_h.finish(grad_weight, plan, hidden.dtype)   # dHidden complete: its rows are free
        sums = _band_sums(plan, step, grad_weight, buffer) if launch.constexprs["NEED_WEIGHT"] else None
        if launch.constexprs["NEED_HIDDEN"]:
            hidden_ptrs, hidden_ints = sums_h.kernel_args(unused, dim)
        else:
            hidden_ptrs, hidden_ints = (unused, unused), (0, 0, dim)
        grid = (-(-n_tokens // launch.constexprs["BLOCK_N"]) * -(-step.v_count // launch.constexprs["BLOCK_V"]),)
        launch.kernel[grid](
            *head, *hidden_ptrs, sums if sums is not None else unused, grad_bias if grad_bias is not None else unused,
            order if order is not None else head[3], n_tokens, vocab, step.v_start, step.v_count, dim,
            hidden.stride(0), weight.stride(0), *hidden_ints, dim, *scalars, **launch.options())
        if sums is not None:
            _cast_band(plan, step, sums, grad_weight, order)
    if grad_hidden is None and sums_h is not None:
        grad_hidden = sums_h.finish(grad_weight, plan, hidden.dtype)
    return grad_hidden, grad_weight
