"""contrastive_loss as an API: the custom op (opcheck, torch.compile, backend choice, no-grad), the errors bad
inputs get, and the distributed delegation. Parity lives in tests/test_contrastive.py."""
from __future__ import annotations

import pytest
import torch

from karma_kernels import ContrastiveLoss, contrastive_loss
from karma_kernels.contrastive.reference import contrastive_loss_reference
from tests.conftest import TRITON_DEVICE


# ---------------------------------------------------------------------------------------------------------------
# custom op machinery

def _op_args(backend, precompute, mode="softmax", symmetric=False, reduction="mean", device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, num_keys = 6, 6 if symmetric else 9
    query = torch.randn(batch, 5, generator=gen).to(device).requires_grad_()
    keys = torch.randn(num_keys, 5, generator=gen).to(device).requires_grad_()
    target = torch.arange(batch, device=device) if symmetric else torch.randint(0, num_keys, (batch,),
                                                                                 generator=gen).to(device)
    temperature = torch.tensor(0.3, device=device, requires_grad=True)
    key_ids = torch.randint(0, 4, (num_keys,), generator=gen).to(device)
    logq = torch.randn(num_keys, generator=gen).to(device).requires_grad_()
    return (query, keys, target, temperature, key_ids, logq, mode, symmetric, reduction, backend, precompute, True)


@pytest.mark.parametrize("mode,symmetric,reduction,precompute", [
    ("softmax", False, "mean", True), ("softmax", True, "sum", True), ("pairwise", False, "none", False),
    ("softmax", True, "none", False)])
def test_opcheck_torch(mode, symmetric, reduction, precompute):
    torch.library.opcheck(torch.ops.karma.contrastive_loss.default,
                          _op_args("torch", precompute, mode, symmetric, reduction))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_backward_op(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    query, keys, target, temperature, key_ids, logq, mode, symmetric, *_ = _op_args(backend, False, "pairwise",
                                                                                  device=device)
    stats = torch.ops.karma.contrastive_loss(query, keys, target, temperature, key_ids, logq, mode, symmetric,
                                             "none", backend, False, True)[1]
    row_coef = torch.rand(query.shape[0], device=device)
    torch.library.opcheck(torch.ops.karma.contrastive_loss_backward.default,
                          (row_coef, query.detach(), keys.detach(), target, temperature.detach(), key_ids,
                           logq.detach(), stats, mode, symmetric, backend, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_triton():
    torch.library.opcheck(torch.ops.karma.contrastive_loss.default,
                          _op_args("triton", False, "softmax", True, "none", device=TRITON_DEVICE),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile():
    gen = torch.Generator().manual_seed(8)
    query = torch.randn(12, 8, generator=gen, requires_grad=True)
    keys = torch.randn(15, 8, generator=gen, requires_grad=True)
    target = torch.randint(0, 15, (12,), generator=gen)
    key_ids = torch.randint(0, 6, (15,), generator=gen)

    def loss_fn(q, k):
        return contrastive_loss(q, k, target, temperature=0.1, key_ids=key_ids, reduction="mean")

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    expected = loss_fn(query, keys)
    expected_grads = torch.autograd.grad(expected, [query, keys])
    got = compiled(query, keys)
    got_grads = torch.autograd.grad(got, [query, keys])
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_backend_choice():
    query, keys = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        contrastive_loss(query, keys, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        contrastive_loss(query, keys, backend="cuda")
    # auto on CPU is the torch path: float64 in, float64 out
    assert contrastive_loss(query, keys).dtype == torch.float64
    torch.testing.assert_close(contrastive_loss(query, keys, backend="reference"), contrastive_loss(query, keys))


def test_no_grad_and_inference():
    query, keys = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4)
    with torch.no_grad():
        loss = contrastive_loss(query, keys, torch.tensor([0, 1, 2, 3, 6]))
    assert not loss.requires_grad
    torch.testing.assert_close(loss, contrastive_loss_reference(query, keys, torch.tensor([0, 1, 2, 3, 6])))


# ---------------------------------------------------------------------------------------------------------------
# bad inputs

def _bad_cases():
    q, k = torch.randn(4, 3), torch.randn(5, 3)
    return [
        (dict(query=q.numpy()), TypeError, "query"),
        (dict(query=torch.randn(4)), ValueError, "query"),
        (dict(query=torch.ones(4, 3, dtype=torch.int64)), TypeError, "query"),
        (dict(keys=torch.randn(5, 4)), ValueError, "keys"),
        (dict(keys=torch.randn(5, 3, dtype=torch.float64)), TypeError, "keys"),
        (dict(keys=torch.randn(3, 3)), ValueError, "M >= B"),
        (dict(keys=torch.randn(0, 3)), ValueError, "keys"),
        (dict(query=torch.randn(0, 3)), ValueError, "query"),
        (dict(target=torch.tensor([0, 1, 2, 5])), ValueError, "target"),
        (dict(target=torch.tensor([0, 1, -1, 2])), ValueError, "target"),
        (dict(target=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "target"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="0.1"), TypeError, "temperature"),
        (dict(temperature=torch.tensor([0.1])), ValueError, "temperature"),
        (dict(key_ids=torch.arange(4)), ValueError, "key_ids"),
        (dict(key_ids=torch.rand(5)), TypeError, "key_ids"),
        (dict(logq=torch.zeros(6)), ValueError, "logq"),
        (dict(logq=torch.zeros(5, dtype=torch.int64)), TypeError, "logq"),
        (dict(mode="bpr"), ValueError, "mode"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(symmetric=True, keys=torch.randn(3, 3)), ValueError, "M >= B"),  # M < B (M > B: hard negatives)
        (dict(symmetric=True, keys=torch.randn(4, 3), mode="pairwise"), ValueError, "symmetric"),
        (dict(symmetric=True, keys=torch.randn(4, 3), target=torch.arange(4)), ValueError, "symmetric"),
        (dict(symmetric=1), TypeError, "symmetric"),
        (dict(keys=torch.randn(5, 3, device="meta")), ValueError, "device"),
    ], q, k


@pytest.mark.parametrize("index", range(len(_bad_cases()[0])))
def test_bad_inputs_raise_clear_errors(index):
    cases, query, keys = _bad_cases()
    overrides, error, text = cases[index]
    args = dict(query=query, keys=keys, target=None)
    args.update(overrides)
    with pytest.raises(error, match=text) as info:
        contrastive_loss(args.pop("query"), args.pop("keys"), args.pop("target"), **args)
    assert "contrastive_loss" in str(info.value)


def test_module_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(temperature=0.0)
    with pytest.raises(ValueError, match="mode"):
        ContrastiveLoss(mode="triplet")


def test_grad_of_unused_inputs_is_none():
    """Only tensors that require grad get one; target and key_ids never do."""
    query, keys = torch.randn(4, 3, requires_grad=True), torch.randn(6, 3)
    loss = contrastive_loss(query, keys, torch.tensor([5, 4, 3, 2]), key_ids=torch.tensor([0, 0, 1, 1, 2, 2]))
    loss.backward()
    assert query.grad is not None and keys.grad is None


def test_process_group_delegates_to_the_distributed_loss():
    """process_group=... routes through karma_kernels.contrastive.distributed (a one-rank gloo group here; the
    multi-rank equalities are tests/test_distributed.py's)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(12)
        query, keys = torch.randn(5, 4, generator=gen), torch.randn(7, 4, generator=gen)
        key_ids = torch.tensor([0, 1, 1, 2, 3, 4, 5])
        local = contrastive_loss(query, keys, key_ids=key_ids, mode="pairwise", reduction="none")
        grouped = contrastive_loss(query, keys, key_ids=key_ids, mode="pairwise", reduction="none",
                                   process_group=dist.group.WORLD)
        torch.testing.assert_close(grouped, local)
    finally:
        dist.destroy_process_group()
