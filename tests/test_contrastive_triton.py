"""Kernel-level properties of the contrastive Triton path that parity tests at interpreter sizes cannot show:
half-precision gradient tiles at realistic batch sizes, the backward schedule choice, autotune pruning/bucketing.
(Parity of both schedules with the reference: tests/test_contrastive.py::test_triton_path; the sm_90 build facts:
tests/test_kernel_audit.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from karma_kernels import contrastive_loss
from karma_kernels.contrastive import triton_configs, triton_impl
from tests.conftest import TRITON_DEVICE
from tests.tolerances import EPS, rel_err


def _realistic_softmax_rows(batch=16384, rows=128, dim=64, temperature=0.05, seed=0):
    """Probabilities of ``rows`` query rows over ``batch`` keys (trained-model-like: each key near its query),
    the one-hot targets and the keys, in float64."""
    gen = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)
    keys = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    keys[:rows] += 0.5 * query
    probs = torch.softmax(query @ keys.T / temperature, dim=1)
    onehot = torch.zeros_like(probs)
    onehot[torch.arange(rows), torch.arange(rows)] = 1.0
    return probs, onehot, keys


def _dq_through_half_tile(unit_grad, coef, keys, dtype, scale, unscale):
    """The kernels' dQ step: tile G*S in float32, cast to the input dtype for tl.dot, float32 accumulation, then
    1/S on the accumulator (the kernels' ``_grad_tile`` -> ``_mma`` -> ``acc * unscale``)."""
    tile = unit_grad.float() * (coef.float() * scale)[:, None]
    return (tile.to(dtype).float() @ keys.to(dtype).float()) * unscale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradient_tile_keeps_small_entries(dtype):
    """At B = 16384 with reduction='mean' the coefficient 1/B times the softmax probabilities falls below
    float16's range: multiplied into the tile before the cast (the pre-scaling kernels: S = 1) most entries flush
    to zero and dQ is off by percents. With the launcher's power-of-two scale the tile keeps them."""
    batch = 16384
    probs, onehot, keys = _realistic_softmax_rows(batch)
    coef = torch.full((probs.shape[0],), 1.0 / batch, dtype=torch.float64)
    unit_grad = probs - onehot
    keys_rounded = keys.to(dtype).double()
    truth = (unit_grad * coef[:, None]) @ keys_rounded

    scale, unscale = triton_impl.grad_scale(coef.float())
    scaled = _dq_through_half_tile(unit_grad, coef, keys, dtype, scale, unscale)
    one = torch.ones(())
    unscaled = _dq_through_half_tile(unit_grad, coef, keys, dtype, one, one)

    err_scaled, err_unscaled = rel_err(scaled, truth), rel_err(unscaled, truth)
    assert err_scaled <= EPS[dtype], f"scaled tile: {err_scaled:.2e}"
    if dtype == torch.float16:
        flushed = float(((unit_grad * coef[:, None]).float().to(dtype) == 0).double().mean())
        assert flushed > 0.5 and err_unscaled > 5 * EPS[dtype], (flushed, err_unscaled)   # what the old kernels did


def test_grad_scale_is_an_exact_power_of_two_in_range():
    for top in (1.0 / 65536, 3e-9, 1.0, 7.5e4, 2.0 ** -60):
        magnitude = torch.tensor([top, top / 3, 0.0])
        scale, unscale = triton_impl.grad_scale(magnitude)
        mantissa, _ = torch.frexp(scale)
        assert float(mantissa) == 0.5 and float(scale * unscale) == 1.0
        assert 2.0 ** 12 <= top * float(scale) < 2.0 ** 13
    scale, unscale = triton_impl.grad_scale(torch.zeros(4))
    assert torch.isfinite(scale) and torch.isfinite(unscale)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_schedule_follows_torch_determinism(deterministic, monkeypatch):
    """torch.use_deterministic_algorithms(True) selects the dQ + dK kernels (no atomics); otherwise one kernel
    adds dQ atomically. The real launch list is recorded on its way to the kernels."""
    started = []
    real_run = triton_configs.run

    def recording_run(launch, args, tune, bucket=()):
        started.append(launch.name)
        return real_run(launch, args, tune, bucket)

    monkeypatch.setattr(triton_impl, "run", recording_run)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        # bfloat16: float32 inputs always take the sliced deterministic schedule (see resident_limit)
        query = torch.randn(9, 32, device=TRITON_DEVICE, dtype=torch.bfloat16, requires_grad=True)
        keys = torch.randn(11, 32, device=TRITON_DEVICE, dtype=torch.bfloat16, requires_grad=True)
        contrastive_loss(query, keys, backend="triton").backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    backward = started[1:]
    assert backward == (["grad_query", "grad_keys"] if deterministic else ["grad_keys_atomic_dq"])


def test_d_tiling_keeps_small_d_resident_and_slices_large_d():
    assert triton_configs.d_tiling(256) == dict(BLOCK_D=256, BLOCK_DV=256, RESIDENT=True, EVEN_D=True)
    assert triton_configs.d_tiling(100) == dict(BLOCK_D=128, BLOCK_DV=128, RESIDENT=True, EVEN_D=False)
    assert triton_configs.d_tiling(512)["RESIDENT"] is False
    atomic = triton_configs.backward_launches(4096, 4096, 512, torch.bfloat16, False, False, False, False, False,
                                              deterministic=False)
    assert [launch.name for launch in atomic] == ["grad_query", "grad_keys"]   # no atomic schedule for D > 256
    fp32 = triton_configs.backward_launches(4096, 4096, 256, torch.float32, False, False, False, False, False,
                                            deterministic=False)
    assert [launch.name for launch in fp32] == ["grad_query", "grad_keys"]


def test_autotune_prunes_configs_over_the_shared_memory_limit():
    import triton

    configs = [triton.Config({"BLOCK_B": b, "BLOCK_M": m}, num_warps=w, num_stages=s)
               for b, m, w, s in ((128, 64, 8, 3), (128, 128, 8, 4), (64, 64, 8, 2))]
    named = {"q_ptr": torch.empty(1, 256, dtype=torch.bfloat16)}
    kept = triton_configs._prune("forward")(configs, named, BLOCK_D=256)
    assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_M"]) for c in kept] == [(128, 64), (64, 64)]
    named32 = {"q_ptr": torch.empty(1, 256, dtype=torch.float32)}
    assert len(triton_configs._prune("forward")(configs, named32, BLOCK_D=256)) == 1   # only (64, 64, 2 stages)


def test_autotune_buckets_batch_sizes_by_power_of_two():
    assert triton_impl._bucket(40000, 40000, 256) == triton_impl._bucket(65536, 50000, 256)
    assert triton_impl._bucket(40000, 40000, 256) != triton_impl._bucket(70000, 40000, 256)
