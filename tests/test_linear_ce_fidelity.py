"""Issue 15 (linear-CE side): a differentiable lse on every backend, double backward, meta tensors, D = 0, numpy
ignore_index, and the options users of the peers reach for (class weights, z-loss and accuracy outputs, shift).
Every gradient is checked against autograd through the float64 reference; tiny shapes (Triton runs under the
interpreter in CI)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from karma_kernels import linear_cross_entropy, prefix_reconstruction_loss
from karma_kernels.linear_ce.reference import linear_cross_entropy_reference
from tests.conftest import TRITON_DEVICE
from tests.linear_ce_cases import make_inputs
from tests.tolerances import assert_close_to_truth

BACKENDS = ["torch", "reference", "triton"]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _leaves(inputs, dtype=None):
    return [None if inputs[k] is None else
            (inputs[k].to(dtype) if dtype else inputs[k]).detach().clone().requires_grad_()
            for k in ("hidden", "weight", "bias")]


def _grads(leaves):
    return [None if t is None else t.grad for t in leaves]


def _assert_grads(label, got, truth, dtype=torch.float32):
    for name, g, t in zip(("hidden", "weight", "bias"), got, truth):
        if t is not None:
            assert g is not None, f"{label}: no gradient for {name}"
            # the float32 baseline: truth rounded once (the tolerance table's K * err + EPS rule)
            assert_close_to_truth(f"{label} d{name}", g, t, t.to(dtype), dtype)


# ----------------------------------------------------------------------------------- differentiable lse (item 5)

LSE_CASES = {
    "z_recipe_mean": dict(),                                   # CCE's loss + z(lse): merged into one backward
    "z_loss_sum": dict(reduction="sum", z_loss=1e-2),          # merged, with the op's own z-loss
    "smoothing_softcap": dict(label_smoothing=0.1, softcap=3.0),   # separate lse backward
    "none_all": dict(reduction="none", z_loss=1e-2, softcap=4.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LSE_CASES))
def test_lse_is_differentiable_like_the_reference(backend, case):
    options = LSE_CASES[case]
    inputs = make_inputs(10, 16, 23, torch.float32, bias=True, ignore_every=4, seed=3, device=_device(backend))
    upstream = torch.randn(10, generator=torch.Generator().manual_seed(5)).to(inputs["hidden"].device)

    def objective(fn, leaves, **extra):
        loss, lse = fn(leaves[0], leaves[1], inputs["target"], bias=leaves[2], return_lse=True, **options, **extra)
        loss_term = (loss * upstream.to(loss.dtype)).sum() if loss.dim() else loss
        return loss_term + 1e-1 * lse.square().mean() + (lse * upstream.to(lse.dtype)).sum() / 7

    ours = _leaves(inputs)
    objective(linear_cross_entropy, ours, backend=backend).backward()
    truth = _leaves(inputs, torch.float64)
    objective(linear_cross_entropy_reference, truth).backward()
    _assert_grads(f"{backend} {case}", _grads(ours), _grads(truth))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_lse_alone_and_of_the_prefix_path(backend):
    """Only the lse used (the loss gets no gradient), and prefix_reconstruction_loss(return_lse=True)."""
    device = _device(backend)
    inputs = make_inputs(12, 8, 19, torch.float32, seed=4, device=device)
    hidden = inputs["hidden"].reshape(2, 6, 8)
    text = inputs["target"].reshape(2, 6)[:, :4].clone()
    text[0, 3] = 0
    ours = [hidden.clone().requires_grad_(), inputs["weight"].clone().requires_grad_()]
    _, lse = prefix_reconstruction_loss(ours[0], ours[1], text, prefix_len=2, pad_id=0, return_lse=True,
                                        backend=backend)
    lse.square().sum().backward()
    truth = [t.double().clone().requires_grad_() for t in (hidden, inputs["weight"])]
    states = truth[0][:, 1:5]
    _, truth_lse = linear_cross_entropy_reference(states, truth[1], text.masked_fill(text == 0, -100),
                                                  return_lse=True)
    truth_lse.square().sum().backward()
    assert_close_to_truth("prefix lse", lse, truth_lse, truth_lse.float(), torch.float32)
    _assert_grads(f"{backend} prefix lse", [ours[0].grad, ours[1].grad, None],
                  [truth[0].grad, truth[1].grad, None])


# ------------------------------------------------------------------------------------ double backward (create_graph)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_gradient_penalty(backend, reduction):
    """A gradient penalty ||dL/dhidden||^2 trained into the weight: second derivatives equal the reference's."""
    inputs = make_inputs(7, 8, 13, torch.float32, bias=True, ignore_every=3, seed=6, device=_device(backend))
    options = dict(reduction=reduction, z_loss=1e-2, softcap=5.0, label_smoothing=0.05)

    def penalty(fn, leaves, **extra):
        loss, lse = fn(leaves[0], leaves[1], inputs["target"], bias=leaves[2], return_lse=True, **options, **extra)
        total = loss.sum() + 0.5 * lse.sum()
        (grad_hidden,) = torch.autograd.grad(total, leaves[0], create_graph=True)
        assert grad_hidden.requires_grad
        return grad_hidden.square().sum()

    ours = _leaves(inputs)
    penalty(linear_cross_entropy, ours, backend=backend).backward()
    truth = _leaves(inputs, torch.float64)
    penalty(linear_cross_entropy_reference, truth).backward()
    _assert_grads(f"{backend} {reduction} double backward", _grads(ours), _grads(truth))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_second_backward_with_retain_graph_other_backends(backend):
    inputs = make_inputs(8, 8, 12, torch.float32, bias=True, ignore_every=3, device=_device(backend))
    leaves = _leaves(inputs)
    loss = linear_cross_entropy(leaves[0], leaves[1], inputs["target"], bias=leaves[2], backend=backend)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward()
    for got, want in zip(_grads(leaves), first):
        torch.testing.assert_close(got, 2 * want)


# ------------------------------------------------------------------------ meta tensors, D = 0, numpy arguments

@pytest.mark.parametrize("backend", ["auto", "torch", "reference", "triton"])
def test_meta_tensors_infer_shapes(backend):
    hidden = torch.empty(3, 5, 8, device="meta", requires_grad=True)
    weight = torch.empty(11, 8, device="meta", requires_grad=True)
    target = torch.empty(3, 5, dtype=torch.long, device="meta")
    loss, lse = linear_cross_entropy(hidden, weight, target, return_lse=True, backend=backend)
    assert loss.shape == () and loss.device.type == "meta" and lse.shape == (3, 5)
    per_token = linear_cross_entropy(hidden, weight, target, reduction="none", backend=backend)
    assert per_token.shape == (3, 5)
    loss.backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast wrapper on a device without autocast
        assert linear_cross_entropy(hidden, weight, target, backend=backend).shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_hidden_size_gives_log_v_like_torch(backend):
    device = _device(backend)
    hidden = torch.randn(4, 0, device=device, requires_grad=True)
    weight = torch.randn(6, 0, device=device, requires_grad=True)
    bias = torch.randn(6, device=device, requires_grad=True)
    target = torch.tensor([0, 5, -100, 2], device=device)
    for b in (None, bias):
        ours = linear_cross_entropy(hidden, weight, target, bias=b, backend=backend)
        expected = F.cross_entropy(F.linear(hidden, weight, b), target)
        torch.testing.assert_close(ours, expected)
    ours.backward()
    expected_bias = torch.autograd.grad(F.cross_entropy(F.linear(hidden, weight, bias), target), bias)[0]
    torch.testing.assert_close(bias.grad, expected_bias)
    assert hidden.grad.shape == (4, 0) and weight.grad.shape == (6, 0)


def test_numpy_integers_are_accepted_like_torch():
    inputs = make_inputs(6, 8, 10, torch.float32, ignore_every=2)
    expected = linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["target"], ignore_index=-100)
    for value in (np.int64(-100), np.int32(-100)):
        got = linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["target"], ignore_index=value)
        torch.testing.assert_close(got, expected)
    assert F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=np.int64(-100)).isfinite()
    hidden = inputs["hidden"].reshape(2, 3, 8)
    text = inputs["target"].reshape(2, 3)[:, :2].clamp_min(0)
    torch.testing.assert_close(
        prefix_reconstruction_loss(hidden, inputs["weight"], text, prefix_len=1, pad_id=np.int64(0)),
        prefix_reconstruction_loss(hidden, inputs["weight"], text, prefix_len=1, pad_id=0))
    for bad in (True, np.bool_(False), 1.0):
        with pytest.raises(TypeError, match="linear_cross_entropy: ignore_index must be an int"):
            linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["target"], ignore_index=bad)


# ------------------------------------------------------------------------------------------------- options

def _weighted_truth(inputs, ce_weight, reduction, z_loss, softcap=None):
    """torch's F.cross_entropy(weight=) on the float64 logits, plus the unweighted z-loss."""
    leaves = _leaves(inputs, torch.float64)
    logits = F.linear(leaves[0], leaves[1], leaves[2])
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    target = inputs["target"].to(logits.device)
    loss = F.cross_entropy(logits, target, weight=ce_weight.double(), reduction=reduction)
    valid = target != -100
    z_tok = torch.where(valid, torch.logsumexp(logits, 1).square(), torch.zeros((), dtype=torch.float64))
    if reduction == "none":
        loss = loss + z_loss * z_tok
    else:
        loss = loss + z_loss * (z_tok.sum() if reduction == "sum" else z_tok.sum() / valid.sum())
    return loss, leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights_follow_torch(backend, reduction):
    inputs = make_inputs(9, 8, 14, torch.float32, bias=True, ignore_every=4, seed=8, device=_device(backend))
    ce_weight = torch.rand(14, generator=torch.Generator().manual_seed(2)).to(inputs["hidden"].device) + 0.2
    truth, truth_leaves = _weighted_truth(inputs, ce_weight, reduction, 1e-2, softcap=6.0)
    upstream = torch.linspace(0.5, 1.5, 9, dtype=torch.float64).to(truth.device)
    (truth * upstream if reduction == "none" else truth).sum().backward()
    ours = _leaves(inputs)
    loss = linear_cross_entropy(ours[0], ours[1], inputs["target"], bias=ours[2], ce_weight=ce_weight,
                                reduction=reduction, z_loss=1e-2, softcap=6.0, backend=backend)
    (loss * upstream.float() if reduction == "none" else loss).sum().backward()
    assert_close_to_truth(f"{backend} weighted loss", loss, truth, truth.float(), torch.float32)
    _assert_grads(f"{backend} weighted {reduction}", _grads(ours), _grads(truth_leaves))


def test_class_weights_with_label_smoothing_refused_and_shape_checked():
    inputs = make_inputs(4, 8, 6, torch.float32)
    with pytest.raises(ValueError, match="linear_cross_entropy: ce_weight with label_smoothing"):
        linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["target"], ce_weight=torch.ones(6),
                             label_smoothing=0.1)
    with pytest.raises(ValueError, match="linear_cross_entropy: ce_weight must have shape"):
        linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["target"], ce_weight=torch.ones(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_loss_and_token_accuracy_outputs(backend):
    inputs = make_inputs(12, 8, 9, torch.float32, bias=True, ignore_every=5, seed=9, device=_device(backend))
    target = inputs["target"]
    logits = F.linear(inputs["hidden"].double(), inputs["weight"].double(), inputs["bias"].double())
    valid = target != -100
    lse = torch.logsumexp(logits, 1)
    correct = ((logits.argmax(1) == target) & valid).double()
    loss, z_part, accuracy = linear_cross_entropy(inputs["hidden"], inputs["weight"], target, bias=inputs["bias"],
                                                  z_loss=1e-2, return_z_loss=True, return_token_accuracy=True,
                                                  backend=backend)
    truth_z = 1e-2 * lse[valid].square().mean()
    assert_close_to_truth("z part", z_part, truth_z, truth_z.float(), torch.float32)
    assert 0 < float(correct.sum()) < int(valid.sum())  # the case distinguishes right from wrong tokens
    torch.testing.assert_close(accuracy.double(), correct.sum() / valid.sum())
    per_loss, lse_out, per_z, per_acc = linear_cross_entropy(
        inputs["hidden"], inputs["weight"], target, bias=inputs["bias"], z_loss=1e-2, reduction="none",
        return_lse=True, return_z_loss=True, return_token_accuracy=True, backend=backend)
    torch.testing.assert_close(per_acc.double(), correct)
    torch.testing.assert_close(per_z, 1e-2 * lse_out.square())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1, 2])
def test_shift_predicts_the_next_tokens(backend, shift):
    inputs = make_inputs(2 * 6, 8, 11, torch.float32, bias=True, ignore_every=5, seed=10, device=_device(backend))
    hidden = inputs["hidden"].reshape(2, 6, 8)
    target = inputs["target"].reshape(2, 6)
    ours = [hidden.clone().requires_grad_(), inputs["weight"].clone().requires_grad_()]
    per_token, lse = linear_cross_entropy(ours[0], ours[1], target, bias=inputs["bias"], reduction="none",
                                          shift=shift, return_lse=True, z_loss=1e-2, backend=backend)
    assert per_token.shape == target.shape and lse.shape == target.shape
    assert (per_token[:, -shift:] == 0).all() and (lse[:, -shift:] == 0).all()
    (per_token.sum() + lse.sum()).backward()
    truth = [t.double().clone().requires_grad_() for t in (hidden, inputs["weight"])]
    truth_loss, truth_lse = linear_cross_entropy_reference(
        truth[0][:, :-shift], truth[1], target[:, shift:], bias=inputs["bias"].double(), reduction="none",
        z_loss=1e-2, return_lse=True)
    (truth_loss.sum() + truth_lse.sum()).backward()
    assert_close_to_truth("shifted loss", per_token[:, :-shift], truth_loss, truth_loss.float(), torch.float32)
    _assert_grads(f"{backend} shift", [ours[0].grad, ours[1].grad, None], [truth[0].grad, truth[1].grad, None])
    mean = linear_cross_entropy(hidden, inputs["weight"], target, bias=inputs["bias"], shift=True, backend=backend)
    truth_mean = linear_cross_entropy_reference(hidden[:, :-1].double(), inputs["weight"].double(), target[:, 1:],
                                                bias=inputs["bias"].double())
    assert_close_to_truth("shift=True mean", mean, truth_mean, truth_mean.float(), torch.float32)


def test_bad_option_arguments_name_op_and_argument():
    inputs = make_inputs(6, 8, 10, torch.float32)
    hidden, weight, target = inputs["hidden"], inputs["weight"], inputs["target"]
    cases = [
        (dict(shift=1.5), TypeError, "shift must be an int"),
        (dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
        (dict(return_token_accuracy=1), TypeError, "return_token_accuracy must be a bool"),
        (dict(ce_weight=torch.ones(10, dtype=torch.long)), TypeError, "ce_weight must be a floating"),
        (dict(process_group="group"), TypeError, "process_group must be a torch.distributed.ProcessGroup"),
    ]
    for kwargs, exc, message in cases:
        with pytest.raises(exc, match=f"linear_cross_entropy: {message}"):
            linear_cross_entropy(hidden, weight, target, **kwargs)
    with pytest.raises(ValueError, match="linear_cross_entropy: shift must be an int in"):
        linear_cross_entropy(hidden.reshape(2, 3, 8), weight, target.reshape(2, 3), shift=3)
    with pytest.raises(ValueError, match="linear_cross_entropy: shift must be an int in"):
        linear_cross_entropy(hidden.reshape(2, 3, 8), weight, target.reshape(2, 3), shift=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_size_one_last_dim_with_any_stride_is_accepted(backend):
    """[N, 1] tensors are is_contiguous() whatever their last stride (a transposed [1, N] row, say)."""
    device = _device(backend)
    hidden = torch.randn(1, 5, device=device).t()
    weight = torch.randn(1, 7, device=device).t()
    assert hidden.is_contiguous() and hidden.stride(-1) != 1 and weight.stride(-1) != 1
    target = torch.tensor([0, 6, 3, -100, 1], device=device)
    expected = F.cross_entropy(hidden @ weight.t(), target)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, target, backend=backend), expected)


def test_ignored_tokens_with_non_finite_hidden_rows_give_no_gradient():
    """An ignored token contributes nothing, not even the NaN of 0 x NaN: on every backend and in the reference."""
    hidden = torch.tensor([[float("nan"), 1.0], [0.5, -1.0], [float("inf"), 0.0]])
    weight = torch.randn(4, 2)
    target = torch.tensor([-100, 2, -100])
    for fn, extra in ((linear_cross_entropy, dict(backend="torch")), (linear_cross_entropy, dict(backend="reference")),
                      (linear_cross_entropy_reference, {})):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        loss, lse = fn(leaves[0], leaves[1], target, return_lse=True, **extra)
        (loss + lse.sum()).backward()
        assert torch.isfinite(loss) and (leaves[0].grad[[0, 2]] == 0).all(), fn
        assert torch.isfinite(leaves[0].grad).all() and torch.isfinite(leaves[1].grad).all(), fn


def test_torch_compile_fullgraph_trains_through_lse_and_shift():
    inputs = make_inputs(12, 16, 30, torch.float32, bias=True, ignore_every=5, seed=12)
    hidden = inputs["hidden"].reshape(3, 4, 16)
    target = inputs["target"].reshape(3, 4)

    def step(hidden, weight, bias):
        loss, lse = linear_cross_entropy(hidden, weight, target, bias=bias, return_lse=True, z_loss=1e-3, shift=1)
        return loss + 1e-2 * lse.square().mean()

    # aot_eager: the tracing of the custom op's autograd (what can break) without inductor's code generation
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = [t.clone().requires_grad_() for t in (hidden, inputs["weight"], inputs["bias"])]
    compiled(*got).backward()
    want = [t.clone().requires_grad_() for t in (hidden, inputs["weight"], inputs["bias"])]
    step(*want).backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend,reduction", [("torch", "mean"), ("reference", "none")])
def test_opcheck_with_a_differentiable_lse(backend, reduction):
    """torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) with the statistics
    differentiable (lse_grad=True)."""
    from karma_kernels.linear_ce.custom_ops import linear_cross_entropy_op

    inputs = make_inputs(7, 8, 12, torch.float32, bias=True, ignore_every=3)
    leaves = [inputs[k].requires_grad_() for k in ("hidden", "weight", "bias")]
    args = (leaves[0], leaves[1], inputs["target"], None, leaves[2], -100, reduction, 0.0, 1e-2, 4.0, backend,
            backend == "torch", True, True, True, 0.0, None, False, True)
    torch.library.opcheck(linear_cross_entropy_op, args)


def test_module_form_carries_the_new_options():
    from karma_kernels import LinearCrossEntropyLoss

    inputs = make_inputs(8, 8, 10, torch.float32, bias=True, ignore_every=3)
    hidden, target = inputs["hidden"].reshape(2, 4, 8), inputs["target"].reshape(2, 4)
    ce_weight = torch.linspace(0.5, 1.5, 10)
    options = dict(ce_weight=ce_weight, shift=1, z_loss=1e-2, return_lse=True, return_token_accuracy=True,
                   ignore_index=np.int64(-100))
    module = LinearCrossEntropyLoss(**options)
    got = module(hidden, inputs["weight"], target, inputs["bias"])
    want = linear_cross_entropy(hidden, inputs["weight"], target, bias=inputs["bias"], **options)
    assert len(got) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_accum_dtype_accepts_torch_float32_like_liger():
    inputs = make_inputs(6, 8, 12, torch.bfloat16, device=TRITON_DEVICE)
    results = []
    for accum_dtype in ("fp32", torch.float32):
        weight = inputs["weight"].clone().requires_grad_()
        linear_cross_entropy(inputs["hidden"], weight, inputs["target"], accum_dtype=accum_dtype,
                             backend="triton").backward()
        results.append(weight.grad)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="linear_cross_entropy: accum_dtype must be None"):
        linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["target"], accum_dtype=torch.float16)
