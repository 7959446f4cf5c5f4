"""Options peers' users reach for (issue 15): sentence-transformers' symmetric loss with hard negatives (MNSRL),
open_clip's sigmoid (SigLIP) loss, TF-Recommenders' per-row ``sample_weight``; each against the peer's own
formula (MNSRL: sentence-transformers' own code), on every backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from karma_kernels import ContrastiveLoss, contrastive_loss
from tests.conftest import TRITON_DEVICE

B, D = 4, 6


def tensors(*shapes, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=dtype) for shape in shapes]


def value_and_grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves)
    loss.sum().backward()
    return [loss.detach()] + [t.grad for t in leaves]


def assert_all_close(got, want, **tolerance):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().to(b.dtype), b, **tolerance)


# ---- symmetric with hard negatives: sentence-transformers' MultipleNegativesSymmetricRankingLoss ----

@pytest.mark.parametrize("negatives", [0, 1, 2])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_symmetric_with_hard_negatives_equals_sentence_transformers(negatives, backend):
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    from sentence_transformers.util import dot_score
    upstream = st_losses.MultipleNegativesRankingLoss(None, scale=7.0, similarity_fct=dot_score,
                                                      directions=("query_to_doc", "doc_to_query"),
                                                      partition_mode="per_direction")
    columns = tensors(*[(B, D)] * (2 + negatives), seed=negatives)
    want = value_and_grads(lambda *c: upstream.compute_loss_from_embeddings(list(c), None), *columns)
    got = value_and_grads(lambda anchor, *docs: contrastive_loss(anchor, torch.cat(docs), temperature=1 / 7.0,
                                                                 symmetric=True, backend=backend), *columns)
    assert_all_close(got, want, rtol=1e-10, atol=1e-12)


def test_symmetric_with_hard_negatives_refused_by_the_triton_kernels_only():
    query, keys = tensors((B, D), (2 * B, D), dtype=torch.float32)
    with pytest.raises(ValueError, match="contrastive_loss: backend='triton' cannot run: symmetric=True"):
        contrastive_loss(query.to(TRITON_DEVICE), keys.to(TRITON_DEVICE), symmetric=True, backend="triton")
    assert torch.isfinite(contrastive_loss(query, keys, symmetric=True))  # auto: the torch path


# ---- sigmoid: open_clip's SigLipLoss ----

def siglip_open_clip(image, text, logit_scale, logit_bias):
    """open_clip's SigLipLoss._loss (one rank): labels 2 I - 1, -logsigmoid(labels * logits), summed / B."""
    logits = logit_scale * image @ text.T + logit_bias
    labels = 2 * torch.eye(image.shape[0], dtype=image.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_sigmoid_mode_equals_open_clip_siglip(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    image, text = tensors((B, D), (B, D), seed=1, dtype=dtype)
    log_scale, bias = torch.tensor(1.2, dtype=dtype), torch.tensor(-3.0, dtype=dtype)
    want = value_and_grads(lambda i, t, s, b: siglip_open_clip(i, t, s.exp(), b), image, text, log_scale, bias)
    got = value_and_grads(lambda i, t, s, b: contrastive_loss(i.to(device), t.to(device), temperature=(-s).exp(),
                                                              mode="sigmoid", bias=b, backend=backend),
                          image, text, log_scale, bias)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert_all_close(got, [w.to(dtype) for w in want], **tolerance)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sigmoid_mode_with_masks_logq_and_more_keys_equals_the_reference(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    query, keys = tensors((5, 20), (37, 20), seed=2, dtype=torch.float32)  # several key tiles, D not a power of 2
    logq = -torch.rand(37, generator=torch.Generator().manual_seed(3))
    options = dict(key_ids=torch.arange(37) % 6, target=torch.tensor([0, 7, 7, 36, 2]), mode="sigmoid")

    def run(backend_name, device_name):
        return value_and_grads(lambda q, k, t, b, lq: contrastive_loss(
            q.to(device_name), k.to(device_name), temperature=t, bias=b, logq=lq.to(device_name),
            backend=backend_name, reduction="none", **{n: v.to(device_name) if torch.is_tensor(v) else v
                                                        for n, v in options.items()}),
            query, keys, torch.tensor(0.3), torch.tensor(-2.0), logq)

    assert_all_close(run(backend, device), run("reference", "cpu"), rtol=2e-5, atol=2e-5)


def test_siglip_module_learns_temperature_and_bias():
    module = ContrastiveLoss(0.1, learn_temperature=True, mode="sigmoid", bias=-10.0, learn_bias=True)
    image, text = tensors((B, D), (B, D), dtype=torch.float32)
    module(F.normalize(image, dim=1), F.normalize(text, dim=1)).backward()
    assert module.bias.grad is not None and module.bias.grad < 0  # every pair looks negative at b = -10
    assert module.log_temperature.grad is not None and torch.isfinite(module.log_temperature.grad)
    with pytest.raises(ValueError, match="ContrastiveLoss: bias"):
        ContrastiveLoss(mode="softmax", bias=1.0)


# ---- sample_weight: TF-Recommenders (Keras) ----

def keras_weighted(per_row, weight, reduction):
    """Keras' reduction of weighted per-row losses: SUM_OVER_BATCH_SIZE divides by B, not by sum(w)."""
    weighted = per_row * weight
    return {"mean": weighted.sum() / per_row.shape[0], "sum": weighted.sum(), "none": weighted}[reduction]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["softmax", "pairwise", "sigmoid"])
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_sample_weight_like_keras(reduction, mode, backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    query, keys = tensors((B, D), (B + 2, D), seed=4, dtype=dtype)
    weight = torch.tensor([0.0, 0.5, 2.0, 1.0], dtype=dtype)

    def unweighted(q, k, t, w):
        per_row = contrastive_loss(q, k, temperature=t, mode=mode, backend="reference", reduction="none")
        return keras_weighted(per_row, w, reduction)

    def weighted(q, k, t, w):
        return contrastive_loss(q.to(device), k.to(device), temperature=t, mode=mode, backend=backend,
                                reduction=reduction, sample_weight=w.to(device))

    inputs = (query, keys, torch.tensor(0.5, dtype=dtype), weight)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert_all_close(value_and_grads(weighted, *inputs), value_and_grads(unweighted, *inputs), **tolerance)


# ---- bad arguments name the op and the argument ----

@pytest.mark.parametrize("overrides, error, text", [
    (dict(bias=1.0), ValueError, "bias"),  # softmax has no bias
    (dict(mode="sigmoid", bias=float("nan")), ValueError, "bias"),
    (dict(mode="sigmoid", bias=torch.tensor([1.0])), ValueError, "bias"),
    (dict(mode="sigmoid", bias="1"), TypeError, "bias"),
    (dict(mode="sigmoid", bias=True), TypeError, "bias"),
    (dict(mode="sigmoid", symmetric=True), ValueError, "symmetric"),
    (dict(sample_weight=torch.ones(3)), ValueError, "sample_weight"),
    (dict(sample_weight=torch.ones(4, dtype=torch.long)), TypeError, "sample_weight"),
    (dict(sample_weight=torch.ones(4, 1)), ValueError, "sample_weight"),
    (dict(sample_weight=[1.0] * 4), TypeError, "sample_weight"),
])
def test_bad_option_arguments(overrides, error, text):
    query, keys = tensors((B, D), (B, D), dtype=torch.float32)
    with pytest.raises(error, match=f"contrastive_loss: {text}"):
        contrastive_loss(query, keys, **overrides)


def test_sigmoid_triton_refuses_wide_features_by_name():
    query = torch.randn(2, 513, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="contrastive_loss: backend='triton' cannot run: the sigmoid-mode"):
        contrastive_loss(query, query, mode="sigmoid", backend="triton")
