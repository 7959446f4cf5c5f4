"""Parity of the fused linear + cross-entropy op with its fp64 reference: loss, lse and every gradient.

Rule (tests/tolerances.py): err(ours, fp64 truth) <= K * err(plain torch in the same dtype, truth) + EPS. The
truth is the reference evaluated in float64 on the very same (dtype-rounded) inputs; plain torch in the same
dtype computes the logits in that dtype, as ``F.cross_entropy(F.linear(...))`` would.

The torch path runs natively on CPU; the Triton path runs under TRITON_INTERPRET=1 (set by conftest) on tiny
shapes, or on the GPU when one is present. ``KARMA_FULL_TESTS=1`` adds the full shape grid.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import karma_kernels
from karma_kernels import LinearCrossEntropyLoss, linear_cross_entropy
from karma_kernels.linear_ce import torch_impl
from karma_kernels.linear_ce.reference import linear_cross_entropy_reference
from tests.linear_ce_cases import (DTYPES, IGNORE, OPTION_SETS, backend_fn, check_against_truth, loss_and_grads,
                                   make_inputs, plain_torch)
from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.tolerances import assert_close_to_truth


# ------------------------------------------------------------------------------------- torch path (native CPU)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,v", [(1, 16, 17), (13, 100, 1000), (257, 256, 1000), (257, 100, 32003)])
def test_torch_path_shapes(n, d, v, dtype):
    inputs = make_inputs(n, d, v, dtype, bias=True, ignore_every=5 if n > 1 else 0)
    check_against_truth(backend_fn("torch"), inputs, dtype, label=f"torch N={n} D={d} V={v}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_torch_path_options(options, dtype):
    inputs = make_inputs(37, 48, 300, dtype, bias=options.startswith("all"), ignore_every=4)
    check_against_truth(backend_fn("torch"), inputs, dtype, label=f"torch {options}", **OPTION_SETS[options])


@pytest.mark.parametrize("options", ["plain", "none", "all_mean", "all_none"])
@pytest.mark.parametrize("compact", [True, False], ids=["compact", "masked"])
def test_torch_path_chunking_and_masking(options, compact):
    """Many small chunks (a ragged last one), and both ways of handling ignored tokens: dropped up front (the
    CPU default) and masked (the no-host-sync way used on other devices)."""
    dtype = torch.float32
    inputs = make_inputs(45, 24, 97, dtype, bias=True, ignore_every=3)
    opts = dict(OPTION_SETS[options])
    reduction = opts.pop("reduction", "mean")
    valid_count = int((inputs["target"] != IGNORE).sum())
    upstream = torch.linspace(-1, 2, 45) if reduction == "none" else torch.tensor(1.0)
    grad_scale = upstream if reduction == "none" else 1.0 / valid_count
    loss, lse, gh, gw, gb = torch_impl.chunked_linear_cross_entropy(
        inputs["hidden"], inputs["weight"], inputs["target"], bias=inputs["bias"], chunk_rows=7, compact=compact,
        grad_scale=grad_scale, need_grad_hidden=True, need_grad_weight=True, need_grad_bias=True, **opts)
    if reduction == "mean":
        loss = loss.sum() / valid_count
    truth_inputs = {k: (t.double() if t is not None and t.is_floating_point() else t) for k, t in inputs.items()}
    truth_loss, truth_grads = loss_and_grads(linear_cross_entropy_reference, truth_inputs, upstream.double(),
                                             reduction=reduction, **opts)
    base_loss, base_grads = loss_and_grads(plain_torch, inputs, upstream, reduction=reduction, **opts)
    assert_close_to_truth("chunked loss", loss, truth_loss, base_loss, dtype)
    _, truth_lse = linear_cross_entropy_reference(truth_inputs["hidden"], truth_inputs["weight"], inputs["target"],
                                                  bias=truth_inputs["bias"], return_lse=True, **opts)
    assert_close_to_truth("chunked lse", lse, truth_lse, truth_lse.float(), dtype)
    for name, grad in (("hidden", gh), ("weight", gw), ("bias", gb)):
        assert_close_to_truth(f"chunked d{name}", grad, truth_grads[name], base_grads[name], dtype)


# ----------------------------------------------------------------------------- Triton path (interpreter on CPU)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_triton_path_options(options, dtype):
    inputs = make_inputs(21, 40, 70, dtype, bias=options in ("plain", "all_mean"), ignore_every=4,
                         device=TRITON_DEVICE)
    check_against_truth(backend_fn("triton"), inputs, dtype, label=f"triton {options}", **OPTION_SETS[options])


@pytest.mark.parametrize("n,d,v", [(1, 16, 17), (13, 100, 33)])
def test_triton_path_odd_shapes(n, d, v):
    inputs = make_inputs(n, d, v, torch.float32, bias=True, device=TRITON_DEVICE)
    check_against_truth(backend_fn("triton"), inputs, torch.float32, label=f"triton N={n} D={d} V={v}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,v", [(1, 16, 17), (13, 100, 1000), (257, 256, 1000), (257, 256, 32003)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_full_shape_grid(backend, n, d, v, dtype):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    if backend == "triton" and not HAS_CUDA and n * d * v > 10 ** 6:
        pytest.skip("too big for the Triton interpreter; run the full set on a GPU")
    for options in ("plain", "all_none"):
        inputs = make_inputs(n, d, v, dtype, bias=True, ignore_every=5 if n > 1 else 0, device=device)
        check_against_truth(backend_fn(backend), inputs, dtype, label=f"{backend} {options}",
                            **OPTION_SETS[options])


# ------------------------------------------------------------------------------------ numerics and edge cases

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_peaked_softmax_and_large_logits(backend, logit_scale):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs = make_inputs(19, 32, 50, torch.float32, peaked=True, logit_scale=logit_scale, device=device)
    check_against_truth(backend_fn(backend), inputs, torch.float32, label=f"{backend} peaked x{logit_scale}",
                        z_loss=1e-4)
    check_against_truth(backend_fn(backend), inputs, torch.float32, label=f"{backend} peaked none",
                        reduction="none")


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored_matches_cross_entropy(backend, reduction):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs = make_inputs(6, 16, 20, torch.float32, bias=True, device=device)
    target = torch.full_like(inputs["target"], IGNORE)
    leaves = [inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss, lse = linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], reduction=reduction,
                                     return_lse=True, backend=backend)
    expected = F.cross_entropy(F.linear(*[t.detach() for t in leaves]), target, reduction=reduction)
    assert loss.shape == expected.shape
    assert torch.equal(loss.isnan(), expected.isnan()), (loss, expected)
    if reduction == "mean":
        assert loss.isnan()
    else:
        assert torch.equal(loss.cpu(), expected.cpu())
    assert torch.equal(lse.cpu(), torch.zeros(6))
    loss.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_single_token_and_empty_batch_match_cross_entropy(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs = make_inputs(1, 16, 20, torch.float32, device=device)
    hidden = inputs["hidden"][0].clone().requires_grad_()  # [D], target 0-d
    target = inputs["target"][0]
    loss = linear_cross_entropy(hidden, inputs["weight"], target, backend=backend)
    loss.backward()
    plain = hidden.detach().clone().requires_grad_()
    expected = F.cross_entropy(F.linear(plain, inputs["weight"]), target)
    expected.backward()
    assert loss.shape == () and linear_cross_entropy(hidden, inputs["weight"], target, reduction="none",
                                                     backend=backend).shape == ()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, plain.grad)
    empty = torch.zeros(0, 16, device=device, requires_grad=True)
    no_target = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in ("mean", "sum", "none"):
        got = linear_cross_entropy(empty, inputs["weight"], no_target, reduction=reduction, backend=backend)
        want = F.cross_entropy(F.linear(empty.detach(), inputs["weight"]), no_target, reduction=reduction)
        assert got.shape == want.shape and torch.equal(got.isnan(), want.isnan())
        got.sum().backward()
        assert empty.grad.shape == (0, 16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lse_output(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs = make_inputs(24, 16, 40, torch.float32, bias=True, ignore_every=3, device=device)
    hidden = inputs["hidden"].reshape(4, 6, 16).requires_grad_()
    target = inputs["target"].reshape(4, 6)
    loss, lse = linear_cross_entropy(hidden, inputs["weight"], target, bias=inputs["bias"], softcap=5.0,
                                     return_lse=True, backend=backend)
    truth_loss, truth_lse = linear_cross_entropy_reference(hidden.double(), inputs["weight"].double(), target,
                                                           bias=inputs["bias"].double(), softcap=5.0,
                                                           return_lse=True)
    assert lse.shape == target.shape and lse.dtype == torch.float32 and lse.requires_grad
    assert_close_to_truth("lse", lse, truth_lse, truth_lse.float(), torch.float32)
    assert_close_to_truth("loss", loss, truth_loss, truth_loss.float(), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_float64_and_backends_agree(backend):
    """fp64 inputs on the torch/reference paths give fp64 results; the Triton path refuses fp64 clearly."""
    inputs = make_inputs(9, 16, 30, torch.float64, bias=True, ignore_every=4)
    if backend == "triton":
        with pytest.raises(ValueError, match="float64"):
            linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["target"], backend="triton")
        return
    check_against_truth(backend_fn(backend), inputs, torch.float64, label=f"{backend} fp64",
                        label_smoothing=0.1, z_loss=1e-3, softcap=6.0)


def test_second_backward_with_retain_graph_equals_the_first():
    """The torch path's precomputed gradients are consumed by the first backward; a second one recomputes."""
    inputs = make_inputs(8, 16, 30, torch.float32, bias=True, ignore_every=3)
    for reduction in ("mean", "sum", "none"):
        leaves = [inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        loss = linear_cross_entropy(leaves[0], leaves[1], inputs["target"], bias=leaves[2], reduction=reduction,
                                    z_loss=1e-2, backend="torch")
        loss.sum().backward(retain_graph=True)
        first = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        loss.sum().backward()
        for got, want in zip((t.grad for t in leaves), first):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_no_grad_forward_matches_and_module_wrapper():
    inputs = make_inputs(15, 16, 40, torch.float32, bias=True, ignore_every=4)
    module = LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, return_lse=True)
    assert "label_smoothing=0.1" in repr(module)
    with torch.no_grad():
        loss, lse = module(inputs["hidden"], inputs["weight"], inputs["target"], inputs["bias"])
    truth = linear_cross_entropy_reference(inputs["hidden"].double(), inputs["weight"].double(), inputs["target"],
                                           bias=inputs["bias"].double(), label_smoothing=0.1, z_loss=1e-3,
                                           softcap=5.0)
    assert_close_to_truth("module loss", loss, truth, truth.float(), torch.float32)
    assert karma_kernels.LinearCrossEntropyLoss is LinearCrossEntropyLoss
