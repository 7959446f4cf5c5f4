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
        # bfloat16: float32 inputs always take the deterministic schedule (see backward_launches)
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
    assert [launch.name for launch in atomic] == ["grad_keys_atomic_dq"]   # D slices, dQ added per slice
    block_m = triton_configs.default_configs(torch.bfloat16).grad_keys.block_m
    # S = 4 slices: 4 logit passes + the 2 gradient dots over D
    assert atomic[0].grid == (4096 // block_m, 4) and atomic[0].matmul_flops == (4 + 2) * 2.0 * 4096 * 4096 * 512
    fp32 = triton_configs.backward_launches(4096, 4096, 256, torch.float32, False, False, False, False, False,
                                            deterministic=False)
    assert [launch.name for launch in fp32] == ["grad_query", "grad_keys"]
    assert all(launch.constexprs["RESIDENT"] and launch.grid[1] == 1 for launch in fp32)   # no D split


def test_autotune_prunes_configs_over_the_shared_memory_limit():
    import triton

    configs = [triton.Config({"BLOCK_B": b, "BLOCK_M": m}, num_warps=w, num_stages=s)
               for b, m, w, s in ((128, 64, 8, 3), (128, 128, 8, 4), (64, 64, 8, 2))]
    named = {"q_ptr": torch.empty(1, 256, dtype=torch.bfloat16)}
    kept = triton_configs._prune("forward")(configs, named, BLOCK_D=256)
    assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_M"]) for c in kept] == [(128, 64), (64, 64)]
    named32 = {"q_ptr": torch.empty(1, 256, dtype=torch.float32)}
    assert len(triton_configs._prune("forward")(configs, named32, BLOCK_D=256)) == 1   # only (64, 64, 2 stages)
    # float32 on GPU: q_ptr holds float16 (hi, lo) parts, 4 bytes per element; float32's default gradient tiles fit
    parts = {"q_ptr": torch.empty(1, 512, dtype=torch.float16)}
    split = [triton.Config({"BLOCK_B": 64, "BLOCK_M": 32}, num_warps=8, num_stages=2)] + configs
    kept = triton_configs._prune("grad_keys")(split, parts, BLOCK_D=256, BLOCK_DV=256, DOT="split_f16",
                                              ATOMIC_DQ=False)
    assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_M"]) for c in kept] == [(64, 32), (64, 64)]


def test_autotune_buckets_batch_sizes_by_power_of_two():
    assert triton_impl._bucket(40000, 40000, 256) == triton_impl._bucket(65536, 50000, 256)
    assert triton_impl._bucket(40000, 40000, 256) != triton_impl._bucket(70000, 40000, 256)


# (B, dtype, key_ids, logq, reduction, SM count the grid is sized for): 72 rows = 5 blocks of 16, so the splits are
# uneven and programs walk several row blocks and key tiles. Each case's seed is its index (not chosen): the
# float32 temperature gradient is a cancelling sum (about 20x here) of P_ij terms, which carried the storage
# rounding of a float32 lse (~ulp(|lse|)) until the statistics kept (shift, log-sum); over 30 seeds of the float32
# "sum" case (bench/contrastive_stats_sweep.py) it is at most 0.43x (torch) / 0.54x (Triton) of the table's bound,
# down from 2.4x / 1.1x
SYMMETRIC_CASES = [
    (72, torch.float32, False, False, "mean", 6),
    (72, torch.float32, True, True, "none", 6),
    (72, torch.bfloat16, True, False, "sum", 20),
    (72, torch.float16, False, True, "mean", 1),
    (40, torch.float32, True, True, "sum", 132),
]


def _symmetric_case_id(index: int) -> str:
    batch, dtype, with_ids, with_logq, reduction, sms = SYMMETRIC_CASES[index]
    return f"B{batch}-{dtype}-ids{int(with_ids)}-logq{int(with_logq)}-{reduction}-sms{sms}"


@pytest.mark.parametrize("case_index", range(len(SYMMETRIC_CASES)), ids=_symmetric_case_id)
def test_symmetric_one_pass_statistics_match_the_reference(case_index, monkeypatch):
    """The symmetric forward forms each tile once and keeps row and column statistics in partial (max, sum exp)
    pairs per split, merged by the launcher: loss and every gradient within the tolerance table, whatever the
    (S_r, S_c) grid."""
    from tests.test_contrastive import check_parity, make_case

    batch, dtype, with_ids, with_logq, reduction, sms = SYMMETRIC_CASES[case_index]
    monkeypatch.setattr(triton_configs, "DEFAULT_SMS", sms)
    case = make_case(batch, batch, 20, dtype, symmetric=True, with_ids=with_ids, with_logq=with_logq,
                     reduction=reduction, seed=case_index, device=TRITON_DEVICE)
    check_parity(case, "triton")


@pytest.mark.parametrize("splits", [(1, 1), (2, 3), (5, 5)])
def test_symmetric_partial_statistics_are_split_invariant(splits):
    """Row lse, column lse and target logits of the one-pass kernel equal the torch path's for any grid, including
    a row's only valid key being its positive and logq = -inf (an infinite column)."""
    from karma_kernels.contrastive import torch_impl

    gen = torch.Generator().manual_seed(1)
    batch, dim = 72, 24
    query, keys = torch.randn(batch, dim, generator=gen) * 3, torch.randn(batch, dim, generator=gen) * 3
    key_ids = torch.arange(batch) // 2
    logq = -torch.rand(batch, generator=gen)
    logq[7] = float("-inf")
    args = (torch.arange(batch), torch.tensor(0.05), key_ids, logq, "softmax", True)
    loss, stats = triton_impl.contrastive_forward(query.to(TRITON_DEVICE), keys.to(TRITON_DEVICE),
                                                  *[a.to(TRITON_DEVICE) if torch.is_tensor(a) else a for a in args],
                                                  splits=splits)
    ref_loss, ref_stats = torch_impl.contrastive_forward(query, keys, *args)[:2]
    finite = torch.isfinite(ref_stats)
    torch.testing.assert_close(stats.cpu()[finite], ref_stats[finite].float(), rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.isfinite(stats.cpu()), finite) and torch.equal(stats.cpu()[~finite], ref_stats[~finite])


def test_symmetric_forward_is_one_pass_with_small_partial_buffers():
    """One launch doing 1F of matmul work (every tile of the exact partition once) on about one program per SM,
    with partial buffers of (S_r + S_c) x (B + M) floats, not (B / BLOCK_B) x M."""
    batch, dim = 65536, 256
    (launch,) = triton_configs.forward_launches(batch, batch, dim, torch.bfloat16, False, True, True, True,
                                                num_sms=132)
    split_r, split_c = launch.grid
    assert launch.matmul_flops == 2.0 * batch * batch * dim and split_r * split_c <= 132
    assert 3 * split_c * batch + 2 * split_r * batch <= 64 * batch
    for blocks, tiles, sms in ((5, 5, 6), (1, 1, 132), (512, 1024, 132), (3, 40, 7), (40, 3, 7)):
        split_r, split_c = triton_configs.symmetric_splits(blocks, tiles, sms)
        assert 1 <= split_r <= blocks and 1 <= split_c <= tiles and split_r * split_c <= max(sms, 1)
        assert tiles < 2 or tiles // split_c >= 2      # every key-tile range has >= 2 tiles


def test_int32_key_ids_keep_equality_of_any_int64_ids():
    """The kernels read key ids as dense int32 ranks: equal ids (beyond 32 bits, negative) map to equal ranks and
    different ids to different ranks."""
    key_ids = torch.tensor([2**40 + 1, -5, 2**40 + 1, 7, 2**32 + 7, -5, 7], device=TRITON_DEVICE)
    target = torch.tensor([3, 0, 6], device=TRITON_DEVICE)
    ranks = triton_impl.int32_key_ids(target, key_ids)
    assert ranks.dtype == torch.int32
    assert torch.equal(ranks[:, None] == ranks[None, :], key_ids[:, None] == key_ids[None, :])
    assert int(ranks.min()) == 0 and int(ranks.max()) == 3
    assert triton_impl.int32_key_ids(target, None) is target


# ---------------------------------------------------------------------------------------------------------------
# float32 on tensor cores: q and k pre-split into float16 (hi, lo) parts ("split_f16", triton_impl.split_f16)

def test_split_f16_parts_reconstruct_the_scaled_input():
    """hi + lo = x * scale to ~2**-22 of the largest entry, scale an exact power of two that puts max |x * scale|
    in [2**13, 2**14) (float16 products of two parts then stay far from float32 overflow); zeros are fine."""
    gen = torch.Generator().manual_seed(3)
    for magnitude in (1e-6, 1.0, 3e4):
        x = torch.randn(37, 24, generator=gen) * magnitude
        x[0, :5] = torch.tensor([0.0, 1e-30, -1e-12, 5e-8, 1.0]) * magnitude   # tiny entries: subnormal lo parts
        parts, scale = triton_impl.split_f16(x)
        assert parts.dtype == torch.float16 and parts.shape == (37, 48)
        mantissa, _ = torch.frexp(scale)
        assert float(mantissa) == 0.5
        scaled = x.double() * float(scale)
        assert 2.0 ** 13 <= float(scaled.abs().max()) < 2.0 ** 14
        rebuilt = parts[:, :24].double() + parts[:, 24:].double()
        assert float((rebuilt - scaled).abs().max() / scaled.abs().max()) <= 2.0 ** -23
    parts, scale = triton_impl.split_f16(torch.zeros(3, 8))
    assert torch.isfinite(scale) and not parts.any()
    x = torch.randn(5, 9, generator=gen)      # D not a multiple of 8: lo starts at column 16 (16-byte aligned)
    parts, scale = triton_impl.split_f16(x)
    assert parts.shape == (5, 32) and not parts[:, 9:16].any() and not parts[:, 25:].any()
    rebuilt = parts[:, :9].double() + parts[:, 16:25].double()
    assert float((rebuilt - x.double() * float(scale)).abs().max()) <= 2.0 ** -23 * 2.0 ** 14


def _split_dot(a_parts, b_parts):
    """The kernels' "split_f16" dot of two (hi, lo) operands: hi·lo, lo·hi, hi·hi into one float32 accumulator
    (float16 products are exact in float32)."""
    (a_hi, a_lo), (b_hi, b_lo) = [(p[0].float(), p[1].float()) for p in (a_parts, b_parts)]
    return a_hi @ b_lo + a_lo @ b_hi + a_hi @ b_hi


def test_split_f16_gradient_dot_is_float32_accurate_at_realistic_size():
    """dQ = G K / T the way the float32 kernels form it at B = 16384 keys, D = 256 (the interpreter runs dots in
    float32 and cannot show this): K from split_f16, the gradient tile G * S split in registers into float16
    (hi, lo), three products per dot. Within the tolerance table's float32 bound; one float16 product (hi·hi
    only) is not, so the check can fail."""
    from tests.tolerances import K as TOLERANCE_K

    probs, onehot, keys = _realistic_softmax_rows(batch=16384, rows=128, dim=256)
    coef = torch.full((probs.shape[0],), 1.0 / 16384, dtype=torch.float64)
    unit_grad = probs - onehot
    keys32 = keys.float()
    truth = (unit_grad * coef[:, None]) @ keys32.double()
    torch_error = rel_err((unit_grad * coef[:, None]).float() @ keys32, truth)
    bound = TOLERANCE_K[torch.float32] * torch_error + EPS[torch.float32]

    scale, unscale = triton_impl.grad_scale(coef.float())
    tile = unit_grad.float() * (coef.float() * scale)[:, None]          # _grad_tile: G * S in float32
    tile_hi = tile.to(torch.float16)                                    # _split_f16 in registers
    tile_parts = (tile_hi, (tile - tile_hi.float()).to(torch.float16))
    key_parts, key_scale = triton_impl.split_f16(keys32)
    key_parts = (key_parts[:, :256], key_parts[:, 256:])
    dq = _split_dot(tile_parts, key_parts) * (unscale / key_scale)
    assert rel_err(dq, truth) <= bound, (rel_err(dq, truth), bound)
    one_product = (tile_hi.float() @ key_parts[0].float()) * (unscale / key_scale)
    assert rel_err(one_product, truth) > bound


def test_split_f16_logits_are_float32_accurate():
    """The logits q . k from the parts of both operands, at D = 256: within the float32 bound of the table."""
    from tests.tolerances import K as TOLERANCE_K

    gen = torch.Generator().manual_seed(4)
    query = F.normalize(torch.randn(256, 256, generator=gen, dtype=torch.float64), dim=1).float()
    keys = F.normalize(torch.randn(2048, 256, generator=gen, dtype=torch.float64), dim=1).float() * 7
    truth = query.double() @ keys.double().T
    bound = TOLERANCE_K[torch.float32] * rel_err(query @ keys.T, truth) + EPS[torch.float32]
    q_parts, q_scale = triton_impl.split_f16(query)
    k_parts, k_scale = triton_impl.split_f16(keys)
    logits = _split_dot((q_parts[:, :256], q_parts[:, 256:]), (k_parts[:, :256].T, k_parts[:, 256:].T))
    assert rel_err(logits / (q_scale * k_scale), truth) <= bound


SPLIT_CASES = [   # (B, M, D, mode, symmetric, key_ids, logq, reduction): the interpreter runs the parts' arithmetic
    (20, 37, 40, "softmax", False, True, True, "mean"),
    (17, 20, 9, "pairwise", False, False, True, "none"),
    (20, 20, 36, "softmax", True, True, True, "sum"),
    (12, 20, 72, "softmax", False, True, False, "mean"),    # D > 64: transposed gradient accumulators
]


@pytest.mark.parametrize("case_args", SPLIT_CASES, ids=lambda a: f"B{a[0]}-D{a[2]}-{a[3]}-sym{int(a[4])}")
def test_float32_split_f16_kernels_match_the_reference(case_args, monkeypatch):
    """The float32 GPU path's kernels ("split_f16": float16 parts of q and k, the gradient tile split in registers,
    scales folded into the temperature) run under the interpreter, whose float16 dots are exact products with
    float32 accumulation as on tensor cores: loss and every gradient within the tolerance table."""
    from tests.test_contrastive import check_parity, make_case

    monkeypatch.setattr(triton_configs, "INTERPRETED_FLOAT32_DOT", "split_f16")
    modes = []
    real_run = triton_configs.run

    def recording_run(launch, args, tune, bucket=()):
        modes.append((launch.constexprs["DOT"], args[0].dtype, launch.constexprs.get("GRAD_DOT", "split_f16")))
        return real_run(launch, args, tune, bucket)

    monkeypatch.setattr(triton_impl, "run", recording_run)
    batch, num_keys, dim, mode, symmetric, with_ids, with_logq, reduction = case_args
    case = make_case(batch, num_keys, dim, torch.float32, mode=mode, symmetric=symmetric, with_ids=with_ids,
                     with_logq=with_logq, reduction=reduction, seed=batch + 1, device=TRITON_DEVICE)
    check_parity(case, "triton")
    grad_mode = "split_f16_t" if dim > 64 else "split_f16"
    assert modes and all(m[:2] == ("split_f16", torch.float16) and m[2] in ("split_f16", grad_mode)
                         for m in modes), modes
    assert any(m[2] == grad_mode for m in modes), modes
