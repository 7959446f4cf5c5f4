"""``contrastive_loss`` on non-finite inputs: every backend gives the semantics of reference.py's docstring."""
from __future__ import annotations

import math

import pytest
import torch

from karma_kernels import contrastive_loss
from tests.conftest import TRITON_DEVICE

BACKENDS = ("reference", "torch", "triton")
B, M, D = 4, 6, 8


def losses_and_grads(backend, query, keys, **options):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q = query.clone().to(device).requires_grad_()
    k = keys.clone().to(device).requires_grad_()
    t = torch.tensor(0.1, device=device, requires_grad=True)
    options = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in options.items()}
    loss = contrastive_loss(q, k, temperature=t, backend=backend, reduction="none", **options)
    loss.sum().backward()
    return loss.detach().cpu(), q.grad.cpu(), k.grad.cpu(), t.grad.cpu()


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=gen), torch.randn(M, D, generator=gen)


@pytest.mark.parametrize("mode", ["softmax", "pairwise"])
def test_a_key_with_sampling_probability_zero(mode):
    """logq = -inf: a +inf logit. As a negative, the row's loss is +inf; as the row's positive too, NaN
    (+inf - +inf); identical on every backend."""
    query, keys = inputs()
    logq = torch.zeros(M)
    logq[5] = float("-inf")  # a negative of every row
    logq[0] = float("-inf")  # row 0's positive
    with torch.no_grad():
        results = [contrastive_loss(query.to(TRITON_DEVICE if b == "triton" else "cpu"),
                                    keys.to(TRITON_DEVICE if b == "triton" else "cpu"), logq=logq.to(
                                        TRITON_DEVICE if b == "triton" else "cpu"), mode=mode, backend=b,
                                    reduction="none").cpu() for b in BACKENDS]
    expected = torch.tensor([math.nan, math.inf, math.inf, math.inf])
    for backend, loss in zip(BACKENDS, results):
        torch.testing.assert_close(loss, expected, equal_nan=True, msg=backend)


@pytest.mark.parametrize("mode", ["softmax", "pairwise"])
def test_a_row_without_valid_negative_has_zero_loss_and_gradient_whatever_its_query(mode):
    query, keys = inputs(1)
    query[0] = float("nan")
    query[1, 3] = float("inf")
    key_ids = torch.tensor([7, 7, 2, 3, 7, 7])  # rows 0 and 1 (positives 0, 1) have negatives 2 and 3 only ...
    key_ids_all_same = torch.full((M,), 7)      # ... here none at all
    for ids in (key_ids, key_ids_all_same):
        results = [losses_and_grads(b, query, keys, key_ids=ids, mode=mode) for b in BACKENDS]
        for backend, (loss, dq, dk, dt) in zip(BACKENDS, results):
            if ids is key_ids_all_same:
                assert torch.equal(loss, torch.zeros(B)), (backend, loss)
                assert not dq.any() and not dk.any() and dt == 0, backend
            else:  # rows with negatives and a NaN / inf query stay NaN; the others are finite
                assert torch.isnan(loss[0]) and torch.isfinite(loss[2:]).all(), (backend, loss)
        for backend, (loss, *_), in zip(BACKENDS[1:], results[1:]):
            torch.testing.assert_close(loss, results[0][0], equal_nan=True, rtol=1e-5, atol=1e-5, msg=backend)
