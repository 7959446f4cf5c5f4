"""Property-based fidelity (issue 15): random shapes, dtypes, masks and non-finite values; every backend agrees
with the reference (topk_merge: exactly; contrastive_loss: within tests/tolerances.py, NaN/inf in the same
places), over every mode (softmax, pairwise, sigmoid with a bias), symmetric with and without hard negatives and
per-row sample weights; bad arguments name the op and the argument. Few examples and tiny shapes: CI time (the
Triton path runs under the interpreter)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karma_kernels import contrastive_loss, topk_merge
from karma_kernels.contrastive.reference import contrastive_loss_reference
from tests.conftest import TRITON_DEVICE
from tests.tolerances import EPS, K, rel_err

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SPECIAL = [np.nan, np.inf, -np.inf, -0.0, 0.0]


@st.composite
def merge_cases(draw):
    num_shards = draw(st.integers(1, 4))
    num_queries = draw(st.integers(1, 4))
    widths = [draw(st.integers(0, 6)) for _ in range(num_shards)]
    metric = draw(st.sampled_from(["l2", "ip"]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    sorted_rows = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    distances, ids = [], []
    for s, width in enumerate(widths):
        values = rng.integers(-3, 4, (num_queries, width)).astype(np.float64)  # ties on purpose
        special = rng.random(values.shape) < 0.2
        values[special] = rng.choice(SPECIAL, special.sum())
        if sorted_rows:
            key = np.where(np.isnan(values), np.inf, -values if metric == "ip" else values)
            order = np.lexsort((np.isnan(values), key), axis=1)  # NaN last
            values = np.take_along_axis(values, order, axis=1)
        row_ids = rng.integers(0, 12, values.shape)  # repeats across shards: dedup has work
        row_ids[rng.random(values.shape) < 0.15] = -1  # padding anywhere, any distance
        distances.append(values.astype(dtype))
        ids.append(row_ids.astype(np.int64))
    options = dict(k=draw(st.integers(1, 12)), metric=metric, sorted=sorted_rows, dedup=draw(st.booleans()),
                   id_offsets=draw(st.none() | st.just([100 * s for s in range(num_shards)])))
    return distances, ids, options


@settings(max_examples=60, **SETTINGS)
@given(merge_cases())
def test_topk_merge_backends_agree_exactly(case):
    distances, ids, options = case
    k = options.pop("k")
    want = topk_merge(distances, ids, k, backend="reference", **options)
    assert not np.signbit(want[0][want[0] == 0]).any()  # -0.0 comes back as +0.0
    for backend in ("compiled", "device_emulation"):
        got = topk_merge(distances, ids, k, backend=backend, **options)
        np.testing.assert_array_equal(got[1], want[1], err_msg=backend)
        np.testing.assert_array_equal(got[0], want[0], err_msg=backend)  # NaN in the same places, +0.0
        assert not np.signbit(got[0][got[0] == 0]).any(), backend


@settings(max_examples=25, **SETTINGS)
@given(k=st.one_of(st.integers(max_value=0), st.integers(2**31, 2**70)), stacked=st.booleans())
def test_topk_merge_bad_k_names_k(k, stacked):
    d, i = np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.int64)
    with pytest.raises(ValueError, match=r"topk_merge: k "):
        topk_merge(d if stacked else list(d), i if stacked else list(i), k)


@st.composite
def contrastive_cases(draw, max_batch=6, max_dim=12, dtypes=(torch.float32, torch.float64), hard_negatives=True):
    batch = draw(st.integers(1, max_batch))
    num_keys = draw(st.integers(batch, batch + 3))
    mode = draw(st.sampled_from(["softmax", "pairwise", "sigmoid"]))
    symmetric = mode == "softmax" and draw(st.booleans())
    if symmetric:  # M == B (CLIP) or M > B (MNSRL: hard negatives after the B positives)
        num_keys = draw(st.integers(batch + 1, 2 * batch + 1)) if hard_negatives and draw(st.booleans()) else batch
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    query = torch.randn(batch, draw(st.integers(1, max_dim)), generator=gen, dtype=torch.float64)
    keys = torch.randn(num_keys, query.shape[1], generator=gen, dtype=torch.float64)
    target = None if symmetric or draw(st.booleans()) else torch.randint(0, num_keys, (batch,), generator=gen)
    key_ids = torch.randint(0, draw(st.integers(1, 4)), (num_keys,), generator=gen) if draw(st.booleans()) else None
    logq = -3 * torch.rand(num_keys, generator=gen, dtype=torch.float64) if draw(st.booleans()) else None
    if draw(st.booleans()):  # a non-finite query row
        query[draw(st.integers(0, batch - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
    options = {}
    if mode == "sigmoid" and draw(st.booleans()):
        options["bias"] = draw(st.sampled_from([-10.0, -1.0, 0.5]))
    if draw(st.booleans()):  # zero and large weights too
        options["sample_weight"] = torch.rand(batch, generator=gen, dtype=torch.float64) * 3
        options["sample_weight"][0] = 0.0
    return dict(query=query, keys=keys, target=target, key_ids=key_ids, logq=logq, mode=mode, symmetric=symmetric,
                temperature=draw(st.sampled_from([0.05, 0.5, 1.0])),
                dtype=draw(st.sampled_from(dtypes)), **options)


def per_row_losses(case, backend, device="cpu"):
    dtype = case["dtype"]
    args = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in case.items() if name not in ("query", "keys", "dtype")}
    query, keys = case["query"].to(dtype).to(device), case["keys"].to(dtype).to(device)
    if backend in ("truth", "same_dtype"):
        compute = torch.float64 if backend == "truth" else dtype
        return contrastive_loss_reference(query.to(compute), keys.to(compute), reduction="none",
                                          compute_dtype=compute, **args)
    return contrastive_loss(query, keys, backend=backend, reduction="none", **args).cpu()


def assert_agree(case, backend, device="cpu"):
    truth = per_row_losses(case, "truth")
    same_dtype = per_row_losses(case, "same_dtype")
    got = per_row_losses(case, backend, device).to(torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(truth)), (backend, got, truth)
    assert torch.equal(torch.isinf(got), torch.isinf(truth)), (backend, got, truth)
    finite = torch.isfinite(truth)
    if finite.any():
        dtype = case["dtype"]
        err, base = rel_err(got[finite], truth[finite]), rel_err(same_dtype[finite], truth[finite])
        assert err <= K[dtype] * base + EPS[dtype], (backend, err, base)


@settings(max_examples=80, **SETTINGS)
@given(contrastive_cases())
def test_contrastive_torch_backend_agrees_with_the_reference(case):
    assert_agree(case, "torch")


@settings(max_examples=10, **SETTINGS)
@given(contrastive_cases(max_batch=3, max_dim=4, dtypes=(torch.float32,), hard_negatives=False))  # kernels' dtypes
def test_contrastive_triton_backend_agrees_with_the_reference(case):
    assert_agree(case, "triton", TRITON_DEVICE)


BAD_CONTRASTIVE = {  # argument -> (bad values, the error they raise)
    "temperature": ([0.0, -1.0, float("nan"), float("inf"), "0.1", torch.tensor([0.1]), torch.tensor(0.0)], None),
    "bias": ([float("nan"), "1", True, torch.tensor([1.0]), torch.tensor(float("inf"))], None),
    "sample_weight": ([torch.ones(2), torch.ones(3, 1), torch.ones(3, dtype=torch.long), [1.0, 1.0, 1.0]], None),
    "target": ([torch.tensor([0, 1, 9]), torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0, 1])], None),
    "key_ids": ([torch.arange(3), torch.rand(4)], None),
    "logq": ([torch.zeros(3), torch.zeros(4, dtype=torch.long)], None),
    "mode": (["bpr", None], None),
    "reduction": (["avg", None], None),
    "symmetric": ([1, "yes"], None),
    "backend": (["cuda", None], None),
}


@settings(max_examples=30, **SETTINGS)
@given(st.sampled_from(sorted(BAD_CONTRASTIVE)).flatmap(
    lambda name: st.tuples(st.just(name), st.sampled_from(BAD_CONTRASTIVE[name][0]))),
    st.sampled_from(["softmax", "pairwise", "sigmoid"]))
def test_contrastive_bad_arguments_name_the_op_and_the_argument(bad, mode):
    """Every bad argument is a ValueError or TypeError whose message names the op and the argument."""
    name, value = bad
    query, keys = torch.randn(3, 2), torch.randn(4, 2)
    options = {"mode": mode, "bias": -1.0 if mode == "sigmoid" else None, name: value}
    with pytest.raises((ValueError, TypeError)) as info:
        contrastive_loss(query, keys, options.pop("target", None), **options)
    assert str(info.value).startswith("contrastive_loss") and name in str(info.value), str(info.value)
