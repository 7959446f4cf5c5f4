"""Parity of ``contrastive_loss`` (torch path natively, Triton path under the interpreter on CPU) with the reference.

Truth is the reference evaluated in float64 on the same (dtype-rounded) inputs; the bound is the tolerance table's
``K * err(plain torch in the same dtype) + EPS`` for the loss and every gradient (query, keys, temperature, logq).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from karma_kernels import ContrastiveLoss, contrastive_loss
from karma_kernels.contrastive import torch_impl
from karma_kernels.contrastive.reference import contrastive_loss_reference
from tests.conftest import HAS_CUDA, TRITON_DEVICE
from tests.tolerances import assert_close_to_truth

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SHAPES = ((1, 1, 3), (7, 12, 64), (127, 127, 100), (300, 311, 256))  # (B, M, D), M >= B
# (mode, symmetric): the three loss families
FAMILIES = (("softmax", False), ("pairwise", False), ("softmax", True))
REDUCTIONS = ("mean", "sum", "none")


@pytest.fixture
def small_chunks(monkeypatch):
    """A tiny chunk budget, so that the torch path runs over many row chunks even at test sizes."""
    monkeypatch.setattr(torch_impl, "CHUNK_BYTES", 4096)


def make_case(batch, num_keys, dim, dtype, *, mode="softmax", symmetric=False, with_ids=False, with_logq=False,
              reduction="mean", temperature=0.1, seed=0, scale=1.0, device="cpu"):
    """Inputs of one case as float64 masters; ``run`` rounds them to the tested dtype."""
    if symmetric:
        num_keys = batch
    gen = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1) * scale
    # keys near their query, so the positive logit stands out as in a trained model
    keys = F.normalize(torch.randn(num_keys, dim, generator=gen, dtype=torch.float64), dim=1) * scale
    keys[: min(batch, num_keys)] += 0.5 * query[: min(batch, num_keys)]
    target = None if symmetric else torch.randint(0, num_keys, (batch,), generator=gen)
    key_ids = torch.randint(0, max(2, num_keys // 2), (num_keys,), generator=gen) if with_ids else None
    logq = -torch.rand(num_keys, generator=gen, dtype=torch.float64) * 3 if with_logq else None
    upstream = torch.rand(batch, generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else None
    return dict(query=query, keys=keys, target=target, key_ids=key_ids, logq=logq, temperature=temperature,
                mode=mode, symmetric=symmetric, reduction=reduction, upstream=upstream, dtype=dtype, device=device)


def run(case, impl, compute_dtype=None, tensor_temperature=True):
    """Loss and gradients (query, keys, temperature, logq) of one implementation.

    impl: a backend name for ``contrastive_loss``, or "truth" / "same_dtype" for the reference in float64 / in
    the input dtype."""
    dtype, device = case["dtype"], case["device"]
    leaf_dtype = torch.float64 if impl == "truth" else dtype
    query = case["query"].to(dtype).to(leaf_dtype).to(device).requires_grad_()
    keys = case["keys"].to(dtype).to(leaf_dtype).to(device).requires_grad_()
    temperature_dtype = torch.float64 if impl == "truth" else torch.float32
    temperature = torch.tensor(case["temperature"], dtype=temperature_dtype, device=device, requires_grad=True)
    logq = None
    if case["logq"] is not None:
        logq = case["logq"].to(temperature_dtype).to(device).requires_grad_()
    target = None if case["target"] is None else case["target"].to(device)
    key_ids = None if case["key_ids"] is None else case["key_ids"].to(device)
    options = dict(temperature=temperature if tensor_temperature else case["temperature"], key_ids=key_ids,
                   logq=logq, mode=case["mode"], symmetric=case["symmetric"], reduction=case["reduction"])
    if impl in ("truth", "same_dtype"):
        loss = contrastive_loss_reference(query, keys, target, compute_dtype=compute_dtype or leaf_dtype,
                                          **options)
    else:
        loss = contrastive_loss(query, keys, target, backend=impl, **options)
    inputs = [query, keys] + ([temperature] if tensor_temperature else []) + ([logq] if logq is not None else [])
    upstream = None if case["upstream"] is None else case["upstream"].to(loss.dtype).to(device)
    grads = torch.autograd.grad(loss, inputs, upstream)
    return [loss.detach()] + [g.detach() for g in grads]


NAMES = ("loss", "grad_query", "grad_keys", "grad_temperature", "grad_logq")


def check_parity(case, impl, baseline_compute_dtype=None, tensor_temperature=True):
    out = run(case, impl, tensor_temperature=tensor_temperature)
    truth = run(case, "truth", tensor_temperature=tensor_temperature)
    baseline = run(case, "same_dtype", compute_dtype=baseline_compute_dtype, tensor_temperature=tensor_temperature)
    names = NAMES if tensor_temperature else NAMES[:3] + NAMES[4:]
    assert len(out) == len(truth) == len(baseline)
    for name, value, true_value, base_value in zip(names, out, truth, baseline):
        if name != "loss":
            assert value.dtype == base_value.dtype, name  # a gradient has the dtype of its tensor
        assert_close_to_truth(name, value, true_value, base_value, case["dtype"])
    expected_loss_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    assert out[0].dtype == expected_loss_dtype


# ---------------------------------------------------------------------------------------------------------------
# torch path, natively

def _covering_options(index):
    """Option combination number ``index`` of a rotation that covers every option across the shape x dtype grid."""
    mode, symmetric = FAMILIES[index % 3]
    return dict(mode=mode, symmetric=symmetric, with_ids=index % 2 == 0, with_logq=(index // 2) % 2 == 0,
                reduction=REDUCTIONS[(index // 3) % 3])


@pytest.mark.parametrize("shape_index,dtype_index", list(itertools.product(range(len(SHAPES)), range(len(DTYPES)))))
def test_torch_path_shapes_dtypes(shape_index, dtype_index, small_chunks):
    batch, num_keys, dim = SHAPES[shape_index]
    case = make_case(batch, num_keys, dim, DTYPES[dtype_index], seed=shape_index * 10 + dtype_index,
                     **_covering_options(shape_index * len(DTYPES) + dtype_index))
    check_parity(case, "torch")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_ids,with_logq", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("mode,symmetric", FAMILIES)
def test_torch_path_options(mode, symmetric, with_ids, with_logq, reduction, small_chunks):
    case = make_case(23, 41, 33, torch.float32, mode=mode, symmetric=symmetric, with_ids=with_ids,
                     with_logq=with_logq, reduction=reduction, seed=7)
    check_parity(case, "torch")


@pytest.mark.parametrize("mode,symmetric", FAMILIES)
def test_torch_path_default_chunking(mode, symmetric):
    """The default chunk budget (one chunk at this size) against many small chunks: same values."""
    case = make_case(60, 70, 16, torch.float32, mode=mode, symmetric=symmetric, with_ids=True, with_logq=True,
                     reduction="none", seed=3)
    check_parity(case, "torch")


@pytest.mark.slow
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_ids,with_logq", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("mode,symmetric", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_path_full(shape, dtype, mode, symmetric, with_ids, with_logq, reduction, small_chunks):
    case = make_case(*shape, dtype, mode=mode, symmetric=symmetric, with_ids=with_ids, with_logq=with_logq,
                     reduction=reduction, seed=11)
    check_parity(case, "torch")


# ---------------------------------------------------------------------------------------------------------------
# Triton path: under the interpreter on CPU (tiny grids; 16-wide tiles so every axis has several tiles and a tail)

TRITON_CASES = [
    # (B, M, D, dtype, mode, symmetric, with_ids, with_logq, reduction)
    (20, 37, 40, torch.float32, "softmax", False, False, False, "mean"),
    (33, 40, 20, torch.bfloat16, "softmax", False, True, True, "none"),
    (18, 35, 24, torch.float16, "pairwise", False, True, False, "sum"),
    (17, 20, 9, torch.float32, "pairwise", False, False, True, "none"),
    (20, 20, 36, torch.float32, "softmax", True, True, True, "mean"),
    (24, 24, 16, torch.bfloat16, "softmax", True, False, False, "none"),
    (1, 1, 3, torch.float32, "softmax", False, False, False, "sum"),
    # D > 256: logits in D chunks, gradients in D slices (the deterministic schedule)
    (5, 7, 300, torch.bfloat16, "pairwise", False, True, True, "mean"),
    (6, 6, 260, torch.float32, "softmax", True, False, True, "none"),
]


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def deterministic_algorithms(request):
    """Both backward schedules: torch.use_deterministic_algorithms(True) selects the one without atomics."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("case_args", TRITON_CASES, ids=lambda a: f"B{a[0]}-M{a[1]}-D{a[2]}-{a[4]}-sym{int(a[5])}")
def test_triton_path(case_args, deterministic_algorithms):
    batch, num_keys, dim, dtype, mode, symmetric, with_ids, with_logq, reduction = case_args
    case = make_case(batch, num_keys, dim, dtype, mode=mode, symmetric=symmetric, with_ids=with_ids,
                     with_logq=with_logq, reduction=reduction, seed=batch, device=TRITON_DEVICE)
    check_parity(case, "triton")


@pytest.mark.slow
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_ids,with_logq", [(False, False), (True, True)])
@pytest.mark.parametrize("mode,symmetric", FAMILIES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("shape", ((1, 1, 3), (7, 12, 64), (127, 127, 100), (300, 311, 256)))
def test_triton_path_full(shape, dtype, mode, symmetric, with_ids, with_logq, reduction):
    if not HAS_CUDA and shape[0] > 40:
        pytest.skip("large grids are for GPUs (the interpreter runs ~1 ms per program instance)")
    case = make_case(*shape, dtype, mode=mode, symmetric=symmetric, with_ids=with_ids, with_logq=with_logq,
                     reduction=reduction, seed=5, device=TRITON_DEVICE)
    check_parity(case, "triton")


# ---------------------------------------------------------------------------------------------------------------
# semantics against plain PyTorch written independently of the reference

def test_default_is_cross_entropy_drop_in():
    gen = torch.Generator().manual_seed(1)
    query, keys = torch.randn(9, 16, generator=gen), torch.randn(13, 16, generator=gen)
    target = torch.randint(0, 13, (9,), generator=gen)
    expected = F.cross_entropy(query @ keys.T / 0.07, target)
    torch.testing.assert_close(contrastive_loss(query, keys, target, temperature=0.07), expected)
    expected_arange = F.cross_entropy(query @ keys[:9].T / 0.05, torch.arange(9))
    torch.testing.assert_close(contrastive_loss(query, keys[:9]), expected_arange)
    # target=None with M > B: keys[:B] are the positives, the rest extra (hard) negatives
    expected_hard = F.cross_entropy(query @ keys.T / 0.05, torch.arange(9), reduction="sum")
    torch.testing.assert_close(contrastive_loss(query, keys, reduction="sum"), expected_hard)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_false_negatives_and_logq_match_masked_cross_entropy(backend):
    gen = torch.Generator().manual_seed(2)
    query, keys = torch.randn(6, 8, generator=gen), torch.randn(10, 8, generator=gen)
    target = torch.tensor([0, 1, 2, 3, 4, 9])
    key_ids = torch.tensor([5, 5, 7, 8, 9, 1, 7, 3, 2, 4])  # keys 0/1 and 2/6 are the same item
    logq = -torch.rand(10, generator=gen)
    logits = query @ keys.T / 0.2 - logq
    false_negative = (key_ids[None, :] == key_ids[target][:, None]) & (torch.arange(10)[None, :] != target[:, None])
    expected = F.cross_entropy(logits.masked_fill(false_negative, float("-inf")), target, reduction="none")
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    out = contrastive_loss(query.to(device), keys.to(device), target.to(device), temperature=0.2,
                           key_ids=key_ids.to(device), logq=logq.to(device), reduction="none", backend=backend)
    torch.testing.assert_close(out.cpu(), expected)
    # distinct ids mask nothing
    distinct = contrastive_loss(query, keys, target, temperature=0.2, key_ids=torch.arange(10), logq=logq,
                                reduction="none", backend="torch")
    torch.testing.assert_close(distinct, F.cross_entropy(logits, target, reduction="none"))


def test_pairwise_and_symmetric_match_plain_torch():
    gen = torch.Generator().manual_seed(3)
    query, keys = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    logits = query @ keys.T / 0.5
    positive = logits.diagonal()
    off_diagonal = ~torch.eye(5, dtype=torch.bool)
    pairwise = (F.softplus(logits - positive[:, None]) * off_diagonal).sum(1) / 4
    torch.testing.assert_close(contrastive_loss(query, keys, temperature=0.5, mode="pairwise", reduction="none"),
                               pairwise)
    clip = (F.cross_entropy(logits, torch.arange(5), reduction="none")
            + F.cross_entropy(logits.T, torch.arange(5), reduction="none")) / 2
    torch.testing.assert_close(contrastive_loss(query, keys, temperature=0.5, symmetric=True, reduction="none"), clip)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode,symmetric", FAMILIES)
def test_fully_masked_rows_are_zero_and_finite(backend, mode, symmetric):
    """Rows whose every negative is a false negative: loss 0, zero gradients, nothing non-finite."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(6, 5, generator=gen).to(device).requires_grad_()
    keys = torch.randn(6, 5, generator=gen).to(device).requires_grad_()
    # rows 0-2 share one item id (each other's false negatives); rows 3-5 have distinct ids
    key_ids = torch.tensor([1, 1, 1, 2, 3, 4], device=device)
    all_masked = contrastive_loss(query[:3], keys[:3], temperature=0.1, key_ids=key_ids[:3], mode=mode,
                                  symmetric=symmetric, reduction="none", backend=backend)
    assert torch.equal(all_masked.detach().cpu(), torch.zeros(3))
    grad_query, grad_keys = torch.autograd.grad(all_masked.sum(), [query, keys])
    assert torch.equal(grad_query, torch.zeros_like(grad_query)) and torch.equal(grad_keys, torch.zeros_like(grad_keys))
    # mixed batch: the fully masked rows count in the mean and stay finite
    loss = contrastive_loss(query, keys, temperature=0.1, key_ids=torch.tensor([1, 2, 2, 2, 3, 4], device=device),
                            mode=mode, symmetric=symmetric, reduction="none", backend=backend)
    assert torch.isfinite(loss).all()
    expected = contrastive_loss_reference(query, keys, None, 0.1, torch.tensor([1, 2, 2, 2, 3, 4], device=device),
                                          None, mode, symmetric, "none")
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_temperature_half_inputs_do_not_overflow(backend, dtype):
    """T = 0.01 with large logits: plain fp16 logits overflow (|s| > 65504); ours accumulate in float32."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    case = make_case(24, 30, 48, dtype, temperature=0.01, scale=40.0, seed=9, with_ids=True, reduction="none",
                     device=device)
    naive = case["query"].to(dtype) @ (case["keys"].to(dtype).T) / torch.tensor(0.01, dtype=dtype)
    if dtype == torch.float16:
        assert not torch.isfinite(naive).all()  # the hazard this test is about is real at this scale
    out = run(case, backend)
    assert all(torch.isfinite(t).all() for t in out)
    # the same-dtype baseline overflows, so bound the error with float32 math on the same rounded inputs
    check_parity(case, backend, baseline_compute_dtype=torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_python_float_temperature(backend):
    case = make_case(9, 11, 7, torch.float32, temperature=0.3, with_logq=True, reduction="sum", device=TRITON_DEVICE
                     if backend == "triton" else "cpu")
    check_parity(case, backend, tensor_temperature=False)


def test_module_learnable_temperature():
    gen = torch.Generator().manual_seed(6)
    query = torch.randn(8, 6, generator=gen, requires_grad=True)
    keys = torch.randn(8, 6, generator=gen)
    module = ContrastiveLoss(temperature=0.2, learn_temperature=True, symmetric=True)
    assert isinstance(module.log_temperature, torch.nn.Parameter)
    loss = module(query, keys)
    loss.backward()
    temperature = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    truth = contrastive_loss_reference(query.detach().double(), keys.double(), None, temperature, symmetric=True)
    (grad_temperature,) = torch.autograd.grad(truth, [temperature])
    torch.testing.assert_close(loss.double(), truth.detach(), rtol=1e-5, atol=1e-6)
    # d/d(log T) = T * d/dT
    torch.testing.assert_close(module.log_temperature.grad.double(), 0.2 * grad_temperature, rtol=1e-4, atol=1e-6)
    fixed = ContrastiveLoss(temperature=0.2, symmetric=True)
    assert list(fixed.parameters()) == []
    torch.testing.assert_close(fixed(query, keys), loss)
    assert "learned" in repr(module)
