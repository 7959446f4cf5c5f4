"""The Triton backward's own steps, which the interpreter cannot show through parity alone: the half-precision
gradient tile cast (emulated in torch), gradient filtering, the deterministic variant and the vocabulary order."""
from __future__ import annotations

import pytest
import torch

from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce import arguments as lce_args
from karma_kernels.linear_ce import torch_impl
from tests.linear_ce_cases import make_inputs
from tests.conftest import TRITON_DEVICE


# ------------------------------------------------------------------ Triton backward: casts, filtering, variants

try:  # a kernel defined at module level (the interpreter resolves a kernel's helpers from its globals)
    import triton
    import triton.language as tl

    from karma_kernels.linear_ce.triton_common import GRAD_TILE_HEADROOM, grad_tile_for_dot

    @triton.jit
    def _scaled_cast_kernel(dz_ptr, lo_ptr, scale_ptr, M: tl.constexpr, N: tl.constexpr,
                            HEADROOM: tl.constexpr):
        offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
        lo, scale = grad_tile_for_dot(tl.load(dz_ptr + offs), tl.float16, HEADROOM)
        tl.store(lo_ptr + offs, lo)
        tl.store(scale_ptr, scale)
except ImportError:
    triton = None


@pytest.mark.parametrize("magnitude", [3e-9, 0.7, 0.0])
def test_kernel_grad_tile_cast_equals_its_torch_emulation(magnitude):
    """The kernels' scaled cast (run here by the interpreter, or the GPU) is bit for bit the torch emulation that
    the accuracy test below checks at realistic sizes."""
    if triton is None:
        pytest.skip("triton is not installed")
    kernel, headroom = _scaled_cast_kernel, GRAD_TILE_HEADROOM
    gen = torch.Generator().manual_seed(3)
    dz = (torch.randn(16, 32, generator=gen) * magnitude).to(TRITON_DEVICE)
    lo = torch.empty(16, 32, dtype=torch.float16, device=TRITON_DEVICE)
    scale = torch.empty(1, dtype=torch.float32, device=TRITON_DEVICE)
    kernel[(1,)](dz, lo, scale, M=16, N=32, HEADROOM=headroom)
    want_lo, want_scale = torch_impl.emulate_grad_tile_cast(dz.cpu(), torch.float16)
    assert torch.equal(lo.cpu(), want_lo) and float(scale) == float(want_scale)
    if magnitude:
        assert 2 ** (headroom - 1) < float(want_lo.float().abs().max()) <= 2 ** headroom


def test_half_precision_grad_tiles_keep_small_entries():
    """fp16 gradients at N = 2048 valid tokens, V = 32000: the logits gradient g (p - y), g = 1/2048, is mostly
    below fp16's smallest subnormal. Casting it as is (the old kernels) flushes most of it and misses the
    tolerance; the power-of-two scaled cast of the kernels (emulated tile by tile, 128 x 128 as on the GPU)
    meets the fp16 tolerance for the 128 tokens checked."""
    gen = torch.Generator().manual_seed(0)
    tokens, vocab, dim, tile = 128, 32000, 64, 128
    grad_scale = 1.0 / 2048
    logits = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64).to(torch.float16)
    dz = torch.softmax(logits, 1)
    dz[torch.arange(tokens), target] -= 1.0
    dz = dz * grad_scale
    truth = dz @ weight.double()
    dz32 = dz.float()
    scaled = torch.zeros(tokens, dim, dtype=torch.float64)
    old = torch.zeros(tokens, dim, dtype=torch.float64)
    for v0 in range(0, vocab, tile):
        block, rows = dz32[:, v0:v0 + tile], weight[v0:v0 + tile].float()
        for n0 in range(0, tokens, tile):
            lo, scale = torch_impl.emulate_grad_tile_cast(block[n0:n0 + tile], torch.float16)
            scaled[n0:n0 + tile] += (lo.float() @ rows).double() * float(scale)
        old += (block.to(torch.float16).float() @ rows).double()
    flushed = float((dz32.to(torch.float16) == 0).float().mean())
    bound = EPS_FP16 = 2e-3
    err_scaled = float((scaled - truth).abs().max() / truth.abs().max())
    err_old = float((old - truth).abs().max() / truth.abs().max())
    assert flushed > 0.5, f"the case should flush most of dz in a plain fp16 cast, flushed {flushed:.2f}"
    assert err_old > bound, f"plain cast error {err_old:.2e} (the test would not tell the two apart)"
    assert err_scaled <= EPS_FP16 / 10, f"scaled cast error {err_scaled:.2e}"


def _tile_filtered_grads(inputs, filter_eps, block_n, block_v):
    """fp64 gradients of the summed loss with every (block_n x block_v) tile whose |dz| < filter_eps skipped."""
    hidden, weight = inputs["hidden"].double().cpu(), inputs["weight"].double().cpu()
    dz = torch.softmax(hidden @ weight.T, 1)
    dz[torch.arange(hidden.shape[0]), inputs["target"].cpu()] -= 1.0
    for n0 in range(0, dz.shape[0], block_n):
        for v0 in range(0, dz.shape[1], block_v):
            tile = dz[n0:n0 + block_n, v0:v0 + block_v]
            if float(tile.abs().max()) < filter_eps:
                tile.zero_()
    return dz @ weight, dz.T @ hidden


def _triton_grads(inputs, **options):
    from karma_kernels.linear_ce import triton_impl

    hidden, weight, target = inputs["hidden"], inputs["weight"], inputs["target"]
    _, stats = triton_impl.forward(hidden, weight, target, bias=options.get("bias"))
    grad_h, grad_w, _ = triton_impl.backward(torch.ones((), device=hidden.device), hidden, weight, target, stats,
                                             **options)
    return grad_h.cpu(), grad_w.cpu()


def test_triton_gradient_filtering_skips_exactly_the_small_tiles():
    from karma_kernels.linear_ce.triton_configs import _tiles

    config = _tiles("backward", "fp32", on_gpu=TRITON_DEVICE != "cpu")
    inputs = make_inputs(40, 24, 200, torch.float32, peaked=True, logit_scale=6.0, device=TRITON_DEVICE)
    exact_h, exact_w = _tile_filtered_grads(inputs, 0.0, config["BLOCK_N"], config["BLOCK_V"])
    for eps in (1e-3, 1e-1):
        want_h, want_w = _tile_filtered_grads(inputs, eps, config["BLOCK_N"], config["BLOCK_V"])
        assert not torch.equal(want_w, exact_w), "this eps should skip some tiles"
        got_h, got_w = _triton_grads(inputs, filter_eps=eps)
        torch.testing.assert_close(got_h.double(), want_h, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_w.double(), want_w, rtol=0, atol=1e-5)
    got_h, got_w = _triton_grads(inputs, filter_eps=2.0)    # |dz| <= 1: every tile skipped
    assert not got_h.any() and not got_w.any()


def test_triton_filter_option_and_auto_default():
    assert lce_args.resolve_filter_eps("auto", torch.bfloat16) == 2.0 ** -12
    assert lce_args.resolve_filter_eps("auto", torch.float16) == 2.0 ** -15
    assert lce_args.resolve_filter_eps("auto", torch.float32) == 0.0
    with pytest.raises(ValueError, match="filter_eps"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                             filter_eps=-1.0)
    with pytest.raises(ValueError, match="accum_dtype"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                             accum_dtype="fp64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_deterministic_variant_and_weight_bands(dtype, monkeypatch):
    """The deterministic two-kernel backward, the default one-pass backward with dWeight in several fp32 bands
    (a tiny band size forced) and with one full fp32 buffer (accum_dtype="fp32") agree."""
    from karma_kernels.linear_ce import triton_configs

    inputs = make_inputs(21, 40, 70, dtype, ignore_every=4, device=TRITON_DEVICE)
    full_h, full_w = _triton_grads(inputs, accum_dtype="fp32")
    det_h, det_w = _triton_grads(inputs, deterministic=True)
    monkeypatch.setattr(triton_configs, "BAND_BYTES", 4 * 40 * 32)
    band_h, band_w = _triton_grads(inputs)
    assert band_w.dtype == dtype
    for got_h, got_w in ((det_h, det_w), (band_h, band_w)):
        torch.testing.assert_close(got_h.float(), full_h.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_w.float(), full_w.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_vocab_order_gives_the_same_gradients(dtype, monkeypatch):
    """With the vocabulary walked in mean-logit order (several bf16 bands forced), the gradients are the same."""
    from karma_kernels.linear_ce import triton_configs

    inputs = make_inputs(21, 40, 70, dtype, bias=True, ignore_every=4, device=TRITON_DEVICE)
    plain_h, plain_w = _triton_grads(inputs, bias=inputs["bias"])
    monkeypatch.setattr(triton_configs, "BAND_BYTES", 4 * 40 * 32)
    ordered_h, ordered_w = _triton_grads(inputs, bias=inputs["bias"], vocab_order=True)
    torch.testing.assert_close(ordered_h.float(), plain_h.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ordered_w.float(), plain_w.float(), rtol=1e-5, atol=1e-6)
