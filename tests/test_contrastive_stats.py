"""The saved softmax statistics layout (torch_impl's docstring): each lse kept as (shift m, log-sum l).

The backward forms coef * P = exp(s - m) * (coef * exp(-l)). With one float32 lse instead, every P of a row
carries the lse's storage rounding, ~ulp(|lse|) / 2 = 9.5e-7 relative at |lse| in [16, 32) (small temperatures),
against ~ulp(l) / 2 for the log-sum (l ~ log M, 4-8x smaller), what torch's own float32 log_softmax carries.
On the code before this layout (stats [3, B], one lse) the test fails: there is no log-sum row to read.
"""
from __future__ import annotations

import pytest
import torch

import karma_kernels  # noqa: F401  (registers torch.ops.karma)
from tests.conftest import HAS_CUDA, TRITON_DEVICE

BATCH = DIM = 64


def _backward_probs(backend: str, logits: torch.Tensor, target: torch.Tensor, collapse: bool) -> torch.Tensor:
    """P of every row as the backward forms it from the forward's saved statistics: query i = row i of the float32
    logits and keys = the identity, so that s = q . k / 1 is exact and dq_i = P_i - onehot(target_i) exactly.
    ``collapse``: the statistics rewritten to the single-lse layout (m' = fl32(m + l), l' = 0)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    query, keys = logits.float().to(device), torch.eye(DIM, device=device)
    target, temperature = target.to(device), torch.ones((), device=device)
    stats = torch.ops.karma.contrastive_loss(query, keys, target, temperature, None, None, "softmax", False, "none",
                                             backend, False, False)[1]
    if collapse:
        stats = stats.clone()
        stats[0], stats[3] = stats[0] + stats[3], 0.0
    ones = torch.ones(BATCH, device=device)
    return torch.ops.karma.contrastive_loss_backward(ones, query, keys, target, temperature, None, None, stats,
                                                     "softmax", False, backend, False)[0].cpu()


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("triton", marks=pytest.mark.skipif(
        HAS_CUDA, reason="float32 gradient dots on the GPU round G to ~2**-22 (split_f16), above the effect"))])
def test_probabilities_from_shift_and_log_sum_beat_a_float32_lse(backend):
    gen = torch.Generator().manual_seed(0)
    # logits ~20 (|lse| in [16, 32), as at temperature 0.05), 19 significant bits: exact in float32
    logits = torch.round((20 + 3 * torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)) * 2**14) / 2**14
    target = logits.argmin(dim=1)   # the -1 at the target column is left out below; its P is ~e^-15
    truth = torch.softmax(logits, dim=1)
    off_target = torch.ones(BATCH, DIM, dtype=torch.bool)
    off_target[torch.arange(BATCH), target] = False
    errors = {}
    for collapse in (False, True):
        probs = _backward_probs(backend, logits, target, collapse).double()
        errors[collapse] = float(((probs - truth).abs() / truth.amax(dim=1, keepdim=True))[off_target].max())
    assert errors[False] <= 4e-7, errors                 # ~ulp(l) + exp's rounding
    assert 3 * errors[False] <= errors[True], errors    # the single float32 lse: ~ulp(|lse|) / 2 = 9.5e-7
