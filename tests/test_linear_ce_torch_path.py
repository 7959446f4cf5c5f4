"""Numerics of the linear-CE gradient formula that the generic parity grid does not reach (issue 15 items 1, 7).

- fp16 on the CPU (torch) path with an upstream gradient < 1: the forward's unit-upstream gradients must be
  scaled before they are cast to fp16, or a weight gradient above 65504 for a unit upstream becomes inf.
- z-loss at V = 1 (p = 1 exactly): dz = (p - 1) + 2 z lse p must keep the z-term; p (1 + 2 z lse) - 1 loses it
  to cancellation. Every backend (reference closed form, torch path, Triton under the interpreter).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce.reference import linear_cross_entropy_reference
from tests.tolerances import assert_close_to_truth


def test_fp16_weight_grad_scaled_before_cast_on_torch_path():
    # "sum" then / N (Hugging Face's num_items_in_batch recipe): the unit-upstream weight gradient is ~N * |x|,
    # far above fp16's 65504, while the real one (upstream 1/N) is ~|x|
    n = 32768
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, 16, generator=gen) + 3).half()
    w = (torch.randn(8, 16, generator=gen) / 4).half()
    target = torch.zeros(n, dtype=torch.long)
    ours = w.clone().requires_grad_()
    (linear_cross_entropy(x, ours, target, reduction="sum", backend="torch") / n).backward()
    assert ours.grad.dtype == torch.float16
    assert torch.isfinite(ours.grad).all()
    truth_w = w.double().requires_grad_()
    (linear_cross_entropy_reference(x.double(), truth_w, target, reduction="sum") / n).backward()
    plain_w = w.clone().requires_grad_()
    (F.cross_entropy(F.linear(x, plain_w).float(), target, reduction="sum") / n).backward()
    assert_close_to_truth("grad_weight", ours.grad, truth_w.grad, plain_w.grad, torch.float16)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_gradient_at_one_class_keeps_z_term(backend, reduction):
    n, d = 16, 8
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(1, d, generator=gen)
    bias = torch.randn(1, generator=gen)
    target = torch.zeros(n, dtype=torch.long)
    z_loss = 1e-4  # the smaller the z-term, the more of it p (1 + 2 z lse) - 1 loses

    def grads(fn, dtype):
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (hidden, weight, bias)]
        loss = fn(inputs[0], inputs[1], target, bias=inputs[2], z_loss=z_loss, reduction=reduction)
        (loss if reduction != "none" else loss.sum()).backward()
        return [t.grad for t in inputs]

    ours = grads(lambda *a, **k: linear_cross_entropy(*a, backend=backend, **k), torch.float32)
    truth = grads(linear_cross_entropy_reference, torch.float64)
    plain = grads(linear_cross_entropy_reference, torch.float32)  # autograd in fp32: what torch gets
    for name, got, exact, baseline in zip(("grad_hidden", "grad_weight", "grad_bias"), ours, truth, plain):
        assert_close_to_truth(f"{backend} {name}", got, exact, baseline, torch.float32)
