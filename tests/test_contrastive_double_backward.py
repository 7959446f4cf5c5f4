"""``contrastive_loss`` under ``create_graph=True`` (gradient penalties, Hessian-vector products) and repeated
backwards with ``retain_graph=True``, on every backend (issue 15)."""
from __future__ import annotations

import pytest
import torch

from karma_kernels import contrastive_loss
from tests.conftest import TRITON_DEVICE

B, M, D = 3, 5, 4
OPTIONS = [dict(), dict(mode="pairwise"), dict(symmetric=True), dict(key_ids=torch.tensor([0, 1, 1, 2, 0])),
           dict(symmetric=True, hard_negatives=True),
           dict(mode="sigmoid", bias=-1.0, sample_weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))]
IDS = ["softmax", "pairwise", "symmetric", "key_ids", "symmetric_hard_negatives", "sigmoid_weighted"]


def make_inputs(dtype, device, symmetric=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, D, generator=gen, dtype=torch.float64)
    keys = torch.randn(B if symmetric else M, D, generator=gen, dtype=torch.float64)
    logq = -torch.rand(keys.shape[0], generator=gen, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device).requires_grad_() for t in (query, keys, torch.tensor(0.3, dtype=dtype),
                                                                        logq)]


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradgradcheck_on_the_torch_path(options, reduction):
    """Second derivatives (query, keys, temperature, logq) equal finite differences of the first ones."""
    options = dict(options)
    symmetric = options.get("symmetric", False) and not options.pop("hard_negatives", False)

    def loss(query, keys, temperature, logq):
        return contrastive_loss(query, keys, temperature=temperature, logq=logq, backend="torch",
                                reduction=reduction, **options)

    inputs = make_inputs(torch.float64, "cpu", symmetric)
    assert torch.autograd.gradgradcheck(loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_penalty_equals_the_reference(backend, reduction):
    """A gradient penalty |d loss / d query|^2 trains every input like the reference does (was: the gradient came
    back with requires_grad=False, so the penalty silently had no gradient)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"

    def penalty_grads(backend_name):
        query, keys, temperature, logq = make_inputs(torch.float32, device)
        loss = contrastive_loss(query, keys, temperature=temperature, logq=logq, backend=backend_name,
                                reduction=reduction).sum()
        (grad_query,) = torch.autograd.grad(loss, query, create_graph=True)
        assert grad_query.requires_grad
        (grad_query ** 2).sum().backward()
        return [t.grad.cpu() for t in (query, keys, temperature, logq)]

    want = penalty_grads("reference")
    for got, expected in zip(penalty_grads(backend), want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert expected.abs().max() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [dict(reduction="mean"), dict(reduction="sum"),
                                     dict(reduction="sum", mode="pairwise"), dict(reduction="mean", symmetric=True)])
def test_a_second_backward_with_retain_graph_equals_the_first(backend, options):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    query, keys, temperature, _ = make_inputs(torch.float32, device, options.get("symmetric", False))
    loss = contrastive_loss(query, keys, temperature=temperature, backend=backend, **options)
    first = torch.autograd.grad(loss, (query, keys, temperature), retain_graph=True)
    second = torch.autograd.grad(loss, (query, keys, temperature), retain_graph=True)
    loss.backward()
    for a, b, accumulated in zip(first, second, (query.grad, keys.grad, temperature.grad)):
        assert torch.equal(a, b) and torch.equal(a, accumulated)
