"""Shared cases for the linear-CE parity tests: inputs rounded from fp64 masters, the plain-torch baseline of the
tolerance rule, and the check of loss and every gradient against the fp64 reference
(err(ours, truth) <= K * err(plain torch, truth) + EPS, tests/tolerances.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce.reference import linear_cross_entropy_reference
from tests.tolerances import assert_close_to_truth

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


def make_inputs(n, d, v, dtype, *, bias=False, ignore_every=0, logit_scale=1.0, peaked=False, seed=0,
                device="cpu"):
    """fp64 master tensors rounded to ``dtype`` (so the truth sees exactly the kernel's inputs)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (logit_scale / math.sqrt(d))
    target = torch.randint(0, v, (n,), generator=gen)
    if peaked:
        # each token's target row equals its hidden state: a sharply peaked softmax with large logits
        rows = torch.randperm(v, generator=gen)[: min(n, v)]
        target[: rows.numel()] = rows
        weight[rows] = hidden[: rows.numel()] * logit_scale
    if ignore_every:
        target[::ignore_every] = IGNORE
    bias_t = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    out = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), target=target,
               bias=None if bias_t is None else bias_t.to(dtype))
    return {k: (t.to(device) if t is not None else None) for k, t in out.items()}


def plain_torch(hidden, weight, target, *, bias=None, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0,
                z_loss=0.0, softcap=None):
    """What a user writes without the op, in the inputs' own dtype (the baseline of the tolerance rule)."""
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.where(valid, torch.logsumexp(logits, -1).square(), torch.zeros_like(loss))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def loss_and_grads(fn, inputs, upstream, **options):
    """Run ``fn`` on fresh leaves and back-propagate ``upstream``; returns (loss, {name: grad})."""
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")
              if inputs[k] is not None}
    loss = fn(leaves["hidden"], leaves["weight"], inputs["target"], bias=leaves.get("bias"), **options)
    (loss.float() * upstream.to(loss.device)).sum().backward()
    return loss.detach(), {k: t.grad for k, t in leaves.items()}


def check_against_truth(ours_fn, inputs, dtype, *, label="", **options):
    reduction = options.get("reduction", "mean")
    n = inputs["target"].numel()
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(n, generator=gen) if reduction == "none" else torch.tensor(1.7)
    truth_inputs = {k: (t.to(torch.float64) if t is not None and t.is_floating_point() else t)
                    for k, t in inputs.items()}
    truth_loss, truth_grads = loss_and_grads(linear_cross_entropy_reference, truth_inputs, upstream.double(),
                                             **options)
    base_loss, base_grads = loss_and_grads(plain_torch, inputs, upstream, **options)
    loss, grads = loss_and_grads(ours_fn, inputs, upstream, **options)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype, f"loss dtype {loss.dtype}"
    assert_close_to_truth(f"{label} loss", loss, truth_loss, base_loss, dtype)
    for name, truth in truth_grads.items():
        assert grads[name].dtype == inputs[name].dtype, f"grad {name} dtype {grads[name].dtype}"
        assert_close_to_truth(f"{label} d{name}", grads[name], truth, base_grads[name], dtype)


def backend_fn(backend):
    def fn(hidden, weight, target, **options):
        return linear_cross_entropy(hidden, weight, target, backend=backend, **options)
    return fn


OPTION_SETS = {
    "plain": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=4.0),
    "all_mean": dict(label_smoothing=0.2, z_loss=1e-2, softcap=3.0),
    "all_none": dict(reduction="none", label_smoothing=0.05, z_loss=1e-3, softcap=8.0),
}

