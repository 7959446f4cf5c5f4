"""linear_cross_entropy and prefix_reconstruction_loss as an API: the prefix loss against its reference, op
registration (opcheck, torch.compile), and the errors bad inputs get."""
from __future__ import annotations

import math

import pytest
import torch

from karma_kernels import LinearCrossEntropyLoss, linear_cross_entropy, prefix_reconstruction_loss
from karma_kernels.linear_ce import custom_ops as lce_ops
from karma_kernels.linear_ce.reference import prefix_reconstruction_loss_reference
from tests.linear_ce_cases import IGNORE, make_inputs
from tests.conftest import TRITON_DEVICE
from tests.tolerances import assert_close_to_truth


# --------------------------------------------------------------------------------- prefix reconstruction loss

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("prefix_len", [1, 4])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_prefix_reconstruction(backend, prefix_len, reduction):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(3)
    batch, text_len, dim, vocab, pad_id = 3, 6, 24, 45, 0
    seq_len = prefix_len + text_len
    hidden = torch.randn(batch, seq_len, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    text_ids = torch.randint(1, vocab, (batch, text_len), generator=gen)
    text_ids[1, 4:] = pad_id
    text_ids[2, 2:] = pad_id
    upstream = torch.randn(batch, text_len, generator=gen) if reduction == "none" else torch.tensor(0.8)

    def run(fn, dtype, **kw):
        h = hidden.to(dtype).to(device).clone().requires_grad_()
        w = weight.to(dtype).to(device).clone().requires_grad_()
        loss = fn(h, w, text_ids.to(device), prefix_len=prefix_len, pad_id=pad_id, reduction=reduction,
                  z_loss=1e-3, **kw)
        (loss.to(upstream.dtype).cpu() * upstream.to(loss.dtype)).sum().backward()
        return loss.detach(), h.grad, w.grad

    truth = run(prefix_reconstruction_loss_reference, torch.float64)
    base = run(prefix_reconstruction_loss_reference, torch.float32)
    ours = run(prefix_reconstruction_loss, torch.float32, backend=backend)
    if reduction == "none":
        assert ours[0].shape == (batch, text_len)
        assert torch.equal(ours[0][text_ids == pad_id].cpu(), torch.zeros(int((text_ids == pad_id).sum())))
    for name, o, t, b in zip(("loss", "dhidden", "dweight"), ours, truth, base):
        assert_close_to_truth(f"prefix {name}", o, t, b, torch.float32)
    # positions before the prefix's last state and the final state predict nothing: no gradient there
    grad_hidden = ours[1]
    assert torch.equal(grad_hidden[:, : prefix_len - 1].cpu(), torch.zeros(batch, prefix_len - 1, dim))
    assert torch.equal(grad_hidden[:, -1].cpu(), torch.zeros(batch, dim))


def test_prefix_reconstruction_reads_hidden_in_place():
    """The shift is a row map into hidden's storage: a non-contiguous hidden (a slice of a bigger buffer with
    a contiguous last dimension) works and only the addressed rows get gradient."""
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(2, 9, 40, generator=gen)
    hidden = big[:, :, 8:24].detach().requires_grad_()  # [2, 9, 16], rows strided by 40
    weight = torch.randn(30, 16, generator=gen)
    text_ids = torch.randint(0, 30, (2, 7), generator=gen)
    loss = prefix_reconstruction_loss(hidden, weight, text_ids, prefix_len=2, backend="torch")
    truth = prefix_reconstruction_loss_reference(hidden.double(), weight.double(), text_ids, prefix_len=2)
    assert_close_to_truth("strided prefix loss", loss, truth, truth.float(), torch.float32)
    loss.backward()
    assert hidden.grad.shape == hidden.shape


# ------------------------------------------------------------------------------------------- op registration

@pytest.mark.parametrize("backend,reduction,precompute", [
    ("torch", "mean", True), ("torch", "sum", False), ("torch", "none", False),
    ("triton", "mean", False), ("triton", "none", False), ("reference", "sum", False)])
def test_opcheck(backend, reduction, precompute):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs = make_inputs(11, 16, 24, torch.float32, bias=True, ignore_every=4, device=device)
    hidden = inputs["hidden"].requires_grad_()
    weight = inputs["weight"].requires_grad_()
    bias = inputs["bias"].requires_grad_()
    args = (hidden, weight, inputs["target"], None, bias, IGNORE, reduction, 0.1, 1e-3, 5.0, backend, precompute,
            True, True, True)
    torch.library.opcheck(lce_ops.linear_cross_entropy_op, args)
    row_index = torch.arange(10, -1, -1, device=device)
    args = (hidden, weight, inputs["target"], row_index, None, IGNORE, reduction, 0.0, 0.0, None, backend, False,
            True, True, False)
    torch.library.opcheck(lce_ops.linear_cross_entropy_op, args)


def test_torch_compile_once():
    inputs = make_inputs(33, 16, 50, torch.float32, bias=True, ignore_every=4)

    def step(hidden, weight, target, bias):
        return linear_cross_entropy(hidden, weight, target, bias=bias, z_loss=1e-3, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True)
    leaves = [inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss = compiled(leaves[0], leaves[1], inputs["target"], leaves[2])
    loss.backward()
    eager = [inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    expected = step(eager[0], eager[1], inputs["target"], eager[2])
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad)


# ----------------------------------------------------------------------------------------------- bad inputs

def _good():
    return make_inputs(5, 8, 12, torch.float32)


@pytest.mark.parametrize("mutate,exc,message", [
    (lambda a: a.update(weight=torch.randn(12, 9)), ValueError, "weight must have shape"),
    (lambda a: a.update(target=torch.tensor([0, 1, 2, 12, 3])), ValueError, "target values must be in"),
    (lambda a: a.update(target=torch.tensor([0, 1, -5, 2, 3])), ValueError, "target values must be in"),
    (lambda a: a.update(target=torch.zeros(5)), TypeError, "target must be an integer"),
    (lambda a: a.update(target=torch.zeros(4, dtype=torch.long)), ValueError, "target must have shape"),
    (lambda a: a.update(hidden="x"), TypeError, "hidden must be a torch.Tensor"),
    (lambda a: a.update(hidden=torch.zeros(5, 8, dtype=torch.long)), TypeError, "hidden must be a floating"),
    (lambda a: a.update(weight=torch.randn(12, 8, dtype=torch.float64)), TypeError, "weight dtype"),
    (lambda a: a.update(bias=torch.randn(11)), ValueError, "bias must have shape"),
    (lambda a: a.update(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (lambda a: a.update(label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda a: a.update(softcap=0.0), ValueError, "softcap"),
    (lambda a: a.update(softcap=-2.0), ValueError, "softcap"),
    (lambda a: a.update(z_loss=-1.0), ValueError, "z_loss"),
    (lambda a: a.update(reduction="avg"), ValueError, "reduction"),
    (lambda a: a.update(ignore_index=1.5), TypeError, "ignore_index"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend"),
])
def test_bad_inputs_linear_cross_entropy(mutate, exc, message):
    args = _good()
    args.update(reduction="mean")
    mutate(args)
    hidden, weight, target = args.pop("hidden"), args.pop("weight"), args.pop("target")
    with pytest.raises(exc, match=message):
        linear_cross_entropy(hidden, weight, target, **args)


@pytest.mark.parametrize("prefix_len,text_shape,pad_id,message", [
    (0, (2, 5), None, "prefix_len"),
    (6, (2, 5), None, "prefix_len"),
    (7, (2, 5), None, "prefix_len"),
    (2, (2, 5), None, "text_ids must have shape"),
    (1, (3, 5), None, "text_ids must have shape"),
    (1, (2, 5), 1.5, "pad_id"),
])
def test_bad_inputs_prefix(prefix_len, text_shape, pad_id, message):
    hidden = torch.randn(2, 6, 8)
    weight = torch.randn(12, 8)
    text_ids = torch.randint(0, 12, text_shape)
    with pytest.raises((ValueError, TypeError), match=message):
        prefix_reconstruction_loss(hidden, weight, text_ids, prefix_len=prefix_len, pad_id=pad_id)


def test_bad_inputs_prefix_ids_out_of_range_and_shape():
    with pytest.raises(ValueError, match="text_ids values must be in"):
        prefix_reconstruction_loss(torch.randn(2, 6, 8), torch.randn(12, 8), torch.full((2, 5), 12), prefix_len=1)
    with pytest.raises(ValueError, match="hidden must be 3-D"):
        prefix_reconstruction_loss(torch.randn(6, 8), torch.randn(12, 8), torch.zeros(2, 5, dtype=torch.long),
                                   prefix_len=1)
    with pytest.raises(ValueError, match="label_smoothing"):
        LinearCrossEntropyLoss(label_smoothing=-1.0)
