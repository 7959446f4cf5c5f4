"""The public ops under torch.autocast: mixed dtypes (bf16 activations, fp32 weights) work like F.linear there.

Under autocast the ops cast their matrix inputs to the autocast dtype and then run with autocast off; so the
result must equal calling the op outside autocast on inputs cast by hand, and gradients must reach the fp32
parameters in fp32.
"""
import pytest
import torch

import karma_kernels as kk


def _cases():
    hidden_shape, vocab, dim = (2, 6), 40, 16
    text = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, vocab, hidden_shape, generator=torch.Generator().manual_seed(2))
    return {
        "linear_cross_entropy": (lambda x, w: kk.linear_cross_entropy(x, w, target, backend="torch"), vocab, dim),
        "prefix_reconstruction_loss": (
            lambda x, w: kk.prefix_reconstruction_loss(x, w, text, prefix_len=1, backend="torch"), vocab, dim),
        "contrastive_loss": (lambda x, w: kk.contrastive_loss(x[:, 0], w[:4], backend="torch"), 4, dim),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_autocast_mixed_dtypes_match_manual_cast(name):
    fn, rows, dim = _cases()[name]
    torch.manual_seed(0)
    activations = torch.randn(2, 6, dim)
    weight = torch.randn(rows, dim, requires_grad=True)

    x = activations.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(x.to(torch.bfloat16), weight)  # bf16 activations beside an fp32 weight, as a model makes them
    loss.backward()
    assert loss.dtype == torch.float32
    assert weight.grad is not None and weight.grad.dtype == torch.float32

    weight_manual = weight.detach().clone().requires_grad_(True)
    x_manual = activations.clone().requires_grad_(True)
    loss_manual = fn(x_manual.to(torch.bfloat16), weight_manual.to(torch.bfloat16))
    loss_manual.backward()
    torch.testing.assert_close(loss, loss_manual)
    torch.testing.assert_close(weight.grad, weight_manual.grad)
    torch.testing.assert_close(x.grad, x_manual.grad)


def test_outside_autocast_mixed_dtypes_still_rejected():
    with pytest.raises(TypeError, match="weight dtype"):
        kk.linear_cross_entropy(torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(10, 8),
                                torch.zeros(3, dtype=torch.long))
