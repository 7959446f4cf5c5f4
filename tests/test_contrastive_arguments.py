"""``contrastive_loss`` arguments as torch / numpy users pass them (issue 15): accepted where torch accepts them,
a clear error naming the argument elsewhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from karma_kernels import contrastive_loss


def inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)


def test_numpy_bool_symmetric_is_a_bool():
    query, keys = inputs()
    for flag in (True, False):
        got = contrastive_loss(query, keys, symmetric=np.bool_(flag), backend="torch")
        torch.testing.assert_close(got, contrastive_loss(query, keys, symmetric=flag, backend="torch"))


@pytest.mark.parametrize("group", ["world", 0, object()])
def test_a_process_group_that_is_not_one_is_refused(group):
    query, keys = inputs()
    with pytest.raises(TypeError, match="contrastive_loss: process_group must be a torch.distributed ProcessGroup"):
        contrastive_loss(query, keys, process_group=group)


@pytest.mark.parametrize("value", [0.0, -0.1, float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_cpu_temperature_tensor_that_is_not_positive_and_finite_is_refused(value, backend):
    query, keys = inputs()
    with pytest.raises(ValueError, match="contrastive_loss: temperature must be > 0 and finite"):
        contrastive_loss(query, keys, temperature=torch.tensor(value), backend=backend)
    with pytest.raises(ValueError, match="contrastive_loss: temperature must be > 0"):
        contrastive_loss(query, keys, temperature=value, backend=backend)
    contrastive_loss(query, keys, temperature=torch.tensor(0.07, requires_grad=True), backend=backend).backward()
