"""Shape inference on meta tensors (as ``F.*`` allow) for ``contrastive_loss`` and ``topk_merge``, with and without
autocast; contiguous tensors whose size-1 dimensions have odd strides on the Triton path (issue 15)."""
from __future__ import annotations

import pytest
import torch

from karma_kernels import contrastive_loss, topk_merge
from tests.conftest import TRITON_DEVICE


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("autocast", [False, True])
def test_contrastive_loss_on_meta_tensors(backend, reduction, autocast):
    query = torch.randn(4, 3, device="meta", requires_grad=True)
    keys = torch.randn(6, 3, device="meta", requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = contrastive_loss(query, keys, backend=backend, reduction=reduction,
                                key_ids=torch.zeros(6, dtype=torch.long, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ((4,) if reduction == "none" else ())
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert query.grad.shape == query.shape and keys.grad.shape == keys.shape and query.grad.device.type == "meta"


def test_contrastive_loss_options_on_meta_tensors():
    query = torch.randn(4, 3, device="meta", requires_grad=True)
    bias = torch.zeros((), device="meta", requires_grad=True)
    loss = contrastive_loss(query, torch.randn(6, 3, device="meta"), mode="sigmoid", bias=bias,
                            sample_weight=torch.ones(4, device="meta"), temperature=torch.ones((), device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert bias.grad.shape == () and query.grad.shape == (4, 3)


@pytest.mark.parametrize("stacked", [False, True])
def test_topk_merge_on_meta_tensors(stacked):
    distances = torch.randn(3, 5, 4, device="meta")
    ids = torch.zeros(3, 5, 4, dtype=torch.long, device="meta")
    if not stacked:
        distances, ids = list(distances), list(ids)
    out_distances, out_ids = topk_merge(distances, ids, 7, metric="ip")
    assert out_distances.device.type == "meta" and out_distances.shape == (5, 7) and out_ids.shape == (5, 7)
    assert out_ids.dtype == torch.int64


def strided(values, strides):
    out = torch.empty_strided(values.shape, strides, device=values.device)
    out.copy_(values)
    assert out.is_contiguous()
    return out


@pytest.mark.parametrize("mode", ["softmax", "pairwise", "sigmoid"])
def test_triton_takes_contiguous_tensors_with_odd_strides_on_size_one_dims(mode):
    """D = 1 with column stride != 1, and B = 1 with an odd row stride: is_contiguous() tensors the kernels take."""
    gen = torch.Generator().manual_seed(0)
    cases = [(strided(torch.randn(4, 1, generator=gen), (1, 7)), strided(torch.randn(5, 1, generator=gen), (1, 3))),
             (strided(torch.randn(1, 6, generator=gen), (11, 1)), torch.randn(3, 6, generator=gen))]
    for query, keys in cases:
        results = []
        for backend, device in (("reference", "cpu"), ("triton", TRITON_DEVICE)):
            q = query.to(device) if device != "cpu" else query.detach().clone(memory_format=torch.preserve_format)
            q.requires_grad_()
            loss = contrastive_loss(q, keys.to(device), mode=mode, backend=backend)
            loss.backward()
            results.append((loss.detach().cpu(), q.grad.cpu()))
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
