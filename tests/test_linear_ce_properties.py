"""Property-based fidelity of linear_cross_entropy (issue 15): random shapes (D = 0 and V = 1 included), dtypes,
layouts, options and non-finite hidden values; the torch and Triton backends (and the reference backend of the op)
agree with autograd through the float64 reference within tests/tolerances.py, non-finite results in the same
places; every bad argument raises ValueError/TypeError naming the op and the argument. Few examples, tiny shapes
(CI time: the Triton path runs under the interpreter)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce.reference import linear_cross_entropy_reference
from tests.conftest import TRITON_DEVICE
from tests.tolerances import EPS, K, rel_err

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
# KARMA_PROPERTY_EXAMPLES=N runs N examples per property (a deeper local search); CI keeps the defaults
DEEP = int(os.environ.get("KARMA_PROPERTY_EXAMPLES", "0"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def cases(draw, triton=False):
    dtype = draw(st.sampled_from(DTYPES[:3] if triton else DTYPES))
    lead = draw(st.sampled_from([(), (1,), (2,), (3,), (2, 3)] if not triton else [(3,), (2, 2)]))
    dim = draw(st.integers(0, 9) if not triton else st.sampled_from([1, 5, 8]))
    vocab = draw(st.integers(1, 13))
    options = dict(reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                   z_loss=draw(st.sampled_from([0.0, 1e-2])),
                   softcap=draw(st.sampled_from([None, 3.0])),
                   return_lse=draw(st.booleans()))
    weighted = draw(st.booleans())
    if not weighted:
        options["label_smoothing"] = draw(st.sampled_from([0.0, 0.1]))
    if len(lead) == 2 and draw(st.booleans()):
        options["shift"] = 1
    layout = draw(st.sampled_from(["contiguous", "row_strided"] + ([] if triton else ["column_major"])))
    nonfinite = draw(st.sampled_from([None, np.nan, np.inf, -np.inf]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    n_tokens = int(np.prod(lead)) if lead else 1
    hidden = torch.randn(*lead, dim, generator=gen, dtype=torch.float64)
    if nonfinite is not None and n_tokens > 1 and dim:
        hidden.reshape(-1, dim)[seed % n_tokens, seed % dim] = float(nonfinite)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) / max(dim, 1) ** 0.5
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if draw(st.booleans()) else None
    target = torch.randint(0, vocab, lead, generator=gen)
    if n_tokens > 1:
        target.reshape(-1)[torch.rand(n_tokens, generator=gen) < 0.25] = -100
    ce_weight = torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.25 if weighted else None
    return dict(dtype=dtype, hidden=hidden, weight=weight, bias=bias, target=target, ce_weight=ce_weight,
                options=options, layout=layout)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "row_strided":   # every other row of a bigger buffer (stride(-1) = 1)
        big = torch.zeros((2,) + tuple(t.shape), dtype=t.dtype)
        big[0] = t
        return big[0]
    if layout == "column_major" and t.dim() == 2:
        return t.t().contiguous().t()
    return t


def _truth(case, precision=torch.float64):
    """Loss, lse and gradients by autograd through the reference (shift and class weights composed): the truth in
    float64, and in the case's own dtype the baseline of the tolerance rule (what torch gets in that dtype)."""
    options = dict(case["options"])
    shift = options.pop("shift", 0)
    leaves = [None if case[k] is None else case[k].to(case["dtype"]).to(precision).clone().requires_grad_()
              for k in ("hidden", "weight", "bias")]
    hidden, target = leaves[0], case["target"]
    if shift:
        hidden, target = hidden[..., :-shift, :], target[..., shift:]
    valid = target != -100
    ce_weight, reduction, z_loss = case["ce_weight"], options.pop("reduction"), options.pop("z_loss")
    options.pop("return_lse")
    per_token, lse = linear_cross_entropy_reference(hidden, leaves[1], target, bias=leaves[2], reduction="none",
                                                    return_lse=True, **options)
    weights = valid.to(per_token.dtype)
    if ce_weight is not None:
        class_weight = ce_weight.to(case["dtype"]).to(per_token.dtype)
        weights = torch.where(valid, class_weight[target.clamp_min(0)], weights * 0)
    z_tok = z_loss * lse.square()
    if reduction == "none":
        loss = weights * per_token + z_tok if ce_weight is not None else per_token + z_tok
    elif reduction == "sum":
        loss = (weights * per_token).sum() + z_tok.sum()
    else:
        loss = (weights * per_token).sum() / weights.sum() + z_tok.sum() / valid.sum()
    if shift:
        pad = [0, shift]
        lse = torch.nn.functional.pad(lse, pad)
        if reduction == "none":
            loss = torch.nn.functional.pad(loss, pad)
    return loss, lse, leaves


def _objective(loss, lse):
    upstream = torch.linspace(0.5, 1.5, max(loss.numel(), 1), dtype=loss.dtype)[: loss.numel()].reshape(loss.shape)
    total = (loss * upstream).sum()
    if lse is not None:
        total = total + 0.1 * lse.square().sum()
    return total


def _compare(label, got, truth, same_dtype, dtype):
    truth = truth.detach()
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(got.detach().double().cpu()), finite), f"{label}: non-finite elsewhere"
    if finite.all() and truth.numel() and float(truth.abs().max()) < EPS[dtype]:
        # an all-but-zero truth (V = 1: p - (1 - eps) - eps / V = 0): relative errors mean nothing, rounding of
        # the O(1) terms (one ulp) is what every path gets
        assert float((got.detach().double().cpu() - truth).abs().max()) <= EPS[dtype], label
    elif finite.all():
        err = rel_err(got, truth)
        baseline = max(rel_err(same_dtype, truth), rel_err(truth.to(got.dtype), truth))
        assert err <= K[dtype] * baseline + EPS[dtype], f"{label}: error {err:.3e} (torch's {baseline:.3e})"


def _check(case, backend, device="cpu", **extra):
    dtype = case["dtype"]
    loss_t, lse_t, truth_leaves = _truth(case)
    _objective(loss_t, lse_t if case["options"]["return_lse"] else None).backward()
    loss_b, lse_b, base_leaves = _truth(case, dtype)
    _objective(loss_b, lse_b if case["options"]["return_lse"] else None).backward()
    leaves = [None if case[k] is None else
              _layout(case[k].to(dtype), case["layout"]).to(device).detach().requires_grad_()
              for k in ("hidden", "weight", "bias")]
    ce_weight = None if case["ce_weight"] is None else case["ce_weight"].to(dtype).to(device)
    out = linear_cross_entropy(leaves[0], leaves[1], case["target"].to(device), bias=leaves[2],
                               ce_weight=ce_weight, backend=backend, **case["options"], **extra)
    loss, lse = out if case["options"]["return_lse"] else (out, None)
    assert loss.shape == loss_t.shape
    _objective(loss.cpu(), None if lse is None else lse.cpu()).backward()
    _compare(f"{backend} loss", loss.cpu(), loss_t, loss_b, dtype)
    if lse is not None:
        _compare(f"{backend} lse", lse.cpu(), lse_t, lse_b, dtype)
    if not torch.isfinite(loss_t).all():
        return  # gradients of a non-finite loss: NaN somewhere on every path, not a contract
    for name, got, truth, base in zip(("hidden", "weight", "bias"), leaves, truth_leaves, base_leaves):
        if truth is not None:
            assert got.grad.dtype == dtype, f"{backend} d{name} dtype"
            _compare(f"{backend} d{name}", got.grad.cpu(), truth.grad, base.grad, dtype)


@settings(max_examples=DEEP or 40, **SETTINGS)
@given(case=cases())
def test_torch_and_reference_backends_match_the_truth(case):
    _check(case, "torch")
    _check(case, "reference")


@settings(max_examples=DEEP // 4 or 10, **SETTINGS)
@given(case=cases(triton=True))
def test_triton_backend_matches_the_truth(case):
    # exact backward (filter_eps=0): the fp16/bf16 default filter skips tiles of zero gradient, which also drops
    # the NaN of 0 x inf that exact arithmetic (and the truth) produce there; the filter has its own tests
    _check(case, "triton", TRITON_DEVICE, filter_eps=0.0)


BAD = [
    ("hidden", dict(hidden=np.zeros((3, 4))), TypeError),
    ("hidden", dict(hidden=torch.zeros(3, 4, dtype=torch.int64)), TypeError),
    ("weight", dict(weight=torch.zeros(5, 3)), ValueError),
    ("weight", dict(weight=torch.zeros(0, 4)), ValueError),
    ("weight", dict(weight=torch.zeros(5, 4, dtype=torch.float64)), TypeError),
    ("bias", dict(bias=torch.zeros(4)), ValueError),
    ("target", dict(target=torch.zeros(3)), TypeError),
    ("target", dict(target=torch.zeros(2, dtype=torch.long)), ValueError),
    ("target", dict(target=torch.tensor([0, 5, 1])), ValueError),
    ("ignore_index", dict(ignore_index=np.float32(-100)), TypeError),
    ("ignore_index", dict(ignore_index=True), TypeError),
    ("reduction", dict(reduction="avg"), ValueError),
    ("label_smoothing", dict(label_smoothing=float("nan")), ValueError),
    ("z_loss", dict(z_loss=float("inf")), ValueError),
    ("softcap", dict(softcap=0), ValueError),
    ("backend", dict(backend="cuda"), ValueError),
    ("filter_eps", dict(filter_eps=-1.0), ValueError),
    ("accum_dtype", dict(accum_dtype="fp16"), ValueError),
    ("return_lse", dict(return_lse=None), TypeError),
    ("vocab_order", dict(vocab_order="yes"), TypeError),
    ("ce_weight", dict(ce_weight=torch.ones(4)), ValueError),
    ("shift", dict(shift=3), ValueError),
    ("process_group", dict(process_group=object()), TypeError),
]


@settings(max_examples=len(BAD) * 2, **SETTINGS)
@given(bad=st.sampled_from(BAD), lead=st.sampled_from([(3,), (1, 3)]))
def test_bad_arguments_name_the_op_and_the_argument(bad, lead):
    name, change, exc = bad
    args = dict(hidden=torch.randn(*lead, 4), weight=torch.randn(5, 4), target=torch.randint(0, 5, lead))
    for key, value in change.items():
        if key in ("hidden", "target") and isinstance(value, torch.Tensor) and len(lead) == 2:
            value = value.unsqueeze(0)
        args[key] = value
    hidden, weight, target = args.pop("hidden"), args.pop("weight"), args.pop("target")
    with pytest.raises(exc, match=f"^linear_cross_entropy: {name}"):
        linear_cross_entropy(hidden, weight, target, **args)
