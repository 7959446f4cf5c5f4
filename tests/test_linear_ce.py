"""Parity of the fused linear + cross-entropy op with its fp64 reference: loss, lse and every gradient.

Rule (tests/tolerances.py): err(ours, fp64 truth) <= K * err(plain torch in the same dtype, truth) + EPS. The
truth is the reference evaluated in float64 on the very same (dtype-rounded) inputs; plain torch in the same
dtype computes the logits in that dtype, as ``F.cross_entropy(F.linear(...))`` would.

The torch path runs natively on CPU; the Triton path runs under TRITON_INTERPRET=1 (set by conftest) on tiny
shapes, or on the GPU when one is present. ``KARMA_FULL_TESTS=1`` adds the full shape grid.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import karma_kernels
from karma_kernels import LinearCrossEntropyLoss, linear_cross_entropy, prefix_reconstruction_loss
from karma_kernels.linear_ce import arguments as lce_args
from karma_kernels.linear_ce import custom_ops as lce_ops
from karma_kernels.linear_ce import torch_impl
from karma_kernels.linear_ce.reference import (linear_cross_entropy_reference,
                                               prefix_reconstruction_loss_reference)
from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.tolerances import assert_close_to_truth

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


# ------------------------------------------------------------------------------------------------ helpers

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


# ------------------------------------------------------------------ Triton backward: casts, filtering, variants

try:  # a kernel defined at module level (the interpreter resolves a kernel's helpers from its globals)
    import triton
    import triton.language as tl

    from karma_kernels.linear_ce.triton_common import GRAD_TILE_HEADROOM, grad_tile_for_dot

    @triton.jit
    def _scaled_cast_kernel(dz_ptr, lo_ptr, scale_ptr, M: tl.constexpr, N: tl.constexpr,
                            HEADROOM: tl.constexpr):
        offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
        lo, scale = grad_tile_for_dot(tl.load(dz_ptr + offs), tl.float16, HEADROOM)
        tl.store(lo_ptr + offs, lo)
        tl.store(scale_ptr, scale)
except ImportError:
    triton = None


@pytest.mark.parametrize("magnitude", [3e-9, 0.7, 0.0])
def test_kernel_grad_tile_cast_equals_its_torch_emulation(magnitude):
    """The kernels' scaled cast (run here by the interpreter, or the GPU) is bit for bit the torch emulation that
    the accuracy test below checks at realistic sizes."""
    if triton is None:
        pytest.skip("triton is not installed")
    kernel, headroom = _scaled_cast_kernel, GRAD_TILE_HEADROOM
    gen = torch.Generator().manual_seed(3)
    dz = (torch.randn(16, 32, generator=gen) * magnitude).to(TRITON_DEVICE)
    lo = torch.empty(16, 32, dtype=torch.float16, device=TRITON_DEVICE)
    scale = torch.empty(1, dtype=torch.float32, device=TRITON_DEVICE)
    kernel[(1,)](dz, lo, scale, M=16, N=32, HEADROOM=headroom)
    want_lo, want_scale = torch_impl.emulate_grad_tile_cast(dz.cpu(), torch.float16)
    assert torch.equal(lo.cpu(), want_lo) and float(scale) == float(want_scale)
    if magnitude:
        assert 2 ** (headroom - 1) < float(want_lo.float().abs().max()) <= 2 ** headroom


def test_half_precision_grad_tiles_keep_small_entries():
    """fp16 gradients at N = 2048 valid tokens, V = 32000: the logits gradient g (p - y), g = 1/2048, is mostly
    below fp16's smallest subnormal. Casting it as is (the old kernels) flushes most of it and misses the
    tolerance; the power-of-two scaled cast of the kernels (emulated tile by tile, 128 x 128 as on the GPU)
    meets the fp16 tolerance for the 128 tokens checked."""
    gen = torch.Generator().manual_seed(0)
    tokens, vocab, dim, tile = 128, 32000, 64, 128
    grad_scale = 1.0 / 2048
    logits = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64).to(torch.float16)
    dz = torch.softmax(logits, 1)
    dz[torch.arange(tokens), target] -= 1.0
    dz = dz * grad_scale
    truth = dz @ weight.double()
    dz32 = dz.float()
    scaled = torch.zeros(tokens, dim, dtype=torch.float64)
    old = torch.zeros(tokens, dim, dtype=torch.float64)
    for v0 in range(0, vocab, tile):
        block, rows = dz32[:, v0:v0 + tile], weight[v0:v0 + tile].float()
        for n0 in range(0, tokens, tile):
            lo, scale = torch_impl.emulate_grad_tile_cast(block[n0:n0 + tile], torch.float16)
            scaled[n0:n0 + tile] += (lo.float() @ rows).double() * float(scale)
        old += (block.to(torch.float16).float() @ rows).double()
    flushed = float((dz32.to(torch.float16) == 0).float().mean())
    bound = EPS_FP16 = 2e-3
    err_scaled = float((scaled - truth).abs().max() / truth.abs().max())
    err_old = float((old - truth).abs().max() / truth.abs().max())
    assert flushed > 0.5, f"the case should flush most of dz in a plain fp16 cast, flushed {flushed:.2f}"
    assert err_old > bound, f"plain cast error {err_old:.2e} (the test would not tell the two apart)"
    assert err_scaled <= EPS_FP16 / 10, f"scaled cast error {err_scaled:.2e}"


def _tile_filtered_grads(inputs, filter_eps, block_n, block_v):
    """fp64 gradients of the summed loss with every (block_n x block_v) tile whose |dz| < filter_eps skipped."""
    hidden, weight = inputs["hidden"].double().cpu(), inputs["weight"].double().cpu()
    dz = torch.softmax(hidden @ weight.T, 1)
    dz[torch.arange(hidden.shape[0]), inputs["target"].cpu()] -= 1.0
    for n0 in range(0, dz.shape[0], block_n):
        for v0 in range(0, dz.shape[1], block_v):
            tile = dz[n0:n0 + block_n, v0:v0 + block_v]
            if float(tile.abs().max()) < filter_eps:
                tile.zero_()
    return dz @ weight, dz.T @ hidden


def _triton_grads(inputs, **options):
    from karma_kernels.linear_ce import triton_impl

    hidden, weight, target = inputs["hidden"], inputs["weight"], inputs["target"]
    _, stats = triton_impl.forward(hidden, weight, target, bias=options.get("bias"))
    grad_h, grad_w, _ = triton_impl.backward(torch.ones((), device=hidden.device), hidden, weight, target, stats,
                                             **options)
    return grad_h.cpu(), grad_w.cpu()


def test_triton_gradient_filtering_skips_exactly_the_small_tiles():
    from karma_kernels.linear_ce.triton_configs import _tiles

    config = _tiles("backward", "fp32", on_gpu=TRITON_DEVICE != "cpu")
    inputs = make_inputs(40, 24, 200, torch.float32, peaked=True, logit_scale=6.0, device=TRITON_DEVICE)
    exact_h, exact_w = _tile_filtered_grads(inputs, 0.0, config["BLOCK_N"], config["BLOCK_V"])
    for eps in (1e-3, 1e-1):
        want_h, want_w = _tile_filtered_grads(inputs, eps, config["BLOCK_N"], config["BLOCK_V"])
        assert not torch.equal(want_w, exact_w), "this eps should skip some tiles"
        got_h, got_w = _triton_grads(inputs, filter_eps=eps)
        torch.testing.assert_close(got_h.double(), want_h, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_w.double(), want_w, rtol=0, atol=1e-5)
    got_h, got_w = _triton_grads(inputs, filter_eps=2.0)    # |dz| <= 1: every tile skipped
    assert not got_h.any() and not got_w.any()


def test_triton_filter_option_and_auto_default():
    assert lce_args.resolve_filter_eps("auto", torch.bfloat16) == 2.0 ** -12
    assert lce_args.resolve_filter_eps("auto", torch.float16) == 2.0 ** -15
    assert lce_args.resolve_filter_eps("auto", torch.float32) == 0.0
    with pytest.raises(ValueError, match="filter_eps"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                             filter_eps=-1.0)
    with pytest.raises(ValueError, match="accum_dtype"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                             accum_dtype="fp64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_deterministic_variant_and_weight_bands(dtype, monkeypatch):
    """The deterministic two-kernel backward, the default one-pass backward with dWeight in several fp32 bands
    (a tiny band size forced) and with one full fp32 buffer (accum_dtype="fp32") agree."""
    from karma_kernels.linear_ce import triton_configs

    inputs = make_inputs(21, 40, 70, dtype, ignore_every=4, device=TRITON_DEVICE)
    full_h, full_w = _triton_grads(inputs, accum_dtype="fp32")
    det_h, det_w = _triton_grads(inputs, deterministic=True)
    monkeypatch.setattr(triton_configs, "BAND_BYTES", 4 * 40 * 32)
    band_h, band_w = _triton_grads(inputs)
    assert band_w.dtype == dtype
    for got_h, got_w in ((det_h, det_w), (band_h, band_w)):
        torch.testing.assert_close(got_h.float(), full_h.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_w.float(), full_w.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_vocab_order_gives_the_same_gradients(dtype, monkeypatch):
    """With the vocabulary walked in mean-logit order (several bf16 bands forced), the gradients are the same."""
    from karma_kernels.linear_ce import triton_configs

    inputs = make_inputs(21, 40, 70, dtype, bias=True, ignore_every=4, device=TRITON_DEVICE)
    plain_h, plain_w = _triton_grads(inputs, bias=inputs["bias"])
    monkeypatch.setattr(triton_configs, "BAND_BYTES", 4 * 40 * 32)
    ordered_h, ordered_w = _triton_grads(inputs, bias=inputs["bias"], vocab_order=True)
    torch.testing.assert_close(ordered_h.float(), plain_h.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ordered_w.float(), plain_w.float(), rtol=1e-5, atol=1e-6)
