"""Numerics of the linear-CE gradient formula that the generic parity grid does not reach (issue 15 items 1, 7).

- fp16 on the CPU (torch) path with an upstream gradient < 1: the forward's unit-upstream gradients must be
  scaled before they are cast to fp16, or a weight gradient above 65504 for a unit upstream becomes inf.
- z-loss at V = 1 (p = 1 exactly): dz = (p - 1) + 2 z lse p must keep the z-term; p (1 + 2 z lse) - 1 loses it
  to cancellation. Every backend (reference closed form, torch path, Triton under the interpreter).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce.reference import linear_cross_entropy_reference
from tests.tolerances import assert_close_to_truth


def test_fp16_weight_grad_scaled_before_cast_on_torch_path():
    # "sum" then / N (Hugging Face's num_items_in_batch recipe): the unit-upstream weight gradient is ~N * |x|,
    # far above fp16's 65504, while the real one (upstream 1/N) is ~|x|
    n = 32768
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, 16, generator=gen) + 3).half()
    w = (torch.randn(8, 16, generator=gen) / 4).half()
    target = torch.zeros(n, dtype=torch.long)
    ours = w.clone().requires_grad_()
    (linear_cross_entropy(x, ours, target, reduction="sum", backend="torch") / n).backward()
    assert ours.grad.dtype == torch.float16
    assert torch.isfinite(ours.grad).all()
    truth_w = w.double().requires_grad_()
    (linear_cross_entropy_reference(x.double(), truth_w, target, reduction="sum") / n).backward()
    plain_w = w.clone().requires_grad_()
    (F.cross_entropy(F.linear(x, plain_w).float(), target, reduction="sum") / n).backward()
    assert_close_to_truth("grad_weight", ours.grad, truth_w.grad, plain_w.grad, torch.float16)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_gradient_at_one_class_keeps_z_term(backend, reduction):
    n, d = 16, 8
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(1, d, generator=gen)
    bias = torch.randn(1, generator=gen)
    target = torch.zeros(n, dtype=torch.long)
    z_loss = 1e-4  # the smaller the z-term, the more of it p (1 + 2 z lse) - 1 loses

    def grads(fn, dtype):
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (hidden, weight, bias)]
        loss = fn(inputs[0], inputs[1], target, bias=inputs[2], z_loss=z_loss, reduction=reduction)
        (loss if reduction != "none" else loss.sum()).backward()
        return [t.grad for t in inputs]

    ours = grads(lambda *a, **k: linear_cross_entropy(*a, backend=backend, **k), torch.float32)
    truth = grads(linear_cross_entropy_reference, torch.float64)
    plain = grads(linear_cross_entropy_reference, torch.float32)  # autograd in fp32: what torch gets
    for name, got, exact, baseline in zip(("grad_hidden", "grad_weight", "grad_bias"), ours, truth, plain):
        assert_close_to_truth(f"{backend} {name}", got, exact, baseline, torch.float32)


# ------------------------------------------------------------------ several objectives on one head, one call

def _two_objectives(backend):
    """Two token sets on one head, each a mean over its valid tokens with its own weight: one weighted call
    vs two linear_cross_entropy calls. Returns ((loss, grads) weighted, (loss, grads) separate)."""
    from karma_kernels.linear_ce.weighted import weighted_linear_cross_entropy

    gen = torch.Generator().manual_seed(2)
    n, d, v = 24, 8, 40
    hidden = [torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(2)]
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) / 3
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    targets = [torch.randint(0, v, (n,), generator=gen) for _ in range(2)]
    targets[0][::5] = -100
    scales = (0.5, 0.7)
    results = []
    for combined in (True, False):
        leaves = [t.float().requires_grad_() for t in (*hidden, weight, bias)]
        if combined:
            valid = [t != -100 for t in targets]
            token_weight = torch.cat([torch.where(m, s / m.sum(), 0.0) for m, s in zip(valid, scales)])
            loss, per_token = weighted_linear_cross_entropy(torch.cat(leaves[:2]), leaves[2], torch.cat(targets),
                                                            token_weight, bias=leaves[3], backend=backend)
            assert per_token.shape == (2 * n,) and not per_token.requires_grad
        else:
            loss = sum(s * linear_cross_entropy(h, leaves[2], t, bias=leaves[3], backend=backend)
                       for s, h, t in zip(scales, leaves[:2], targets))
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    return results


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_weighted_call_equals_separate_objectives(backend):
    (loss, grads), (want_loss, want_grads) = _two_objectives(backend)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_weighted_call_arguments_and_second_backward_recomputes():
    from karma_kernels.linear_ce.weighted import weighted_linear_cross_entropy

    hidden, weight = torch.randn(4, 3), torch.randn(5, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, -100])
    with pytest.raises(ValueError, match="weighted_linear_cross_entropy: target and token_weight"):
        weighted_linear_cross_entropy(hidden, weight, target, torch.ones(3))
    with pytest.raises(ValueError, match="weighted_linear_cross_entropy: target values"):
        weighted_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 5, 2]), torch.ones(4))
    token_weight = torch.tensor([0.5, 0.25, 2.0, 1.0])
    loss, _ = weighted_linear_cross_entropy(hidden, weight, target, token_weight, backend="torch")
    (0.5 * loss).backward(retain_graph=True)  # upstream 0.5: the in-place scaling must not leak into the second
    first = weight.grad.clone()
    weight.grad = None
    (0.5 * loss).backward()  # recomputed: the forward's gradients were consumed by the first backward
    torch.testing.assert_close(weight.grad, first, rtol=1e-6, atol=1e-7)
    expected = torch.autograd.grad(
        0.5 * (F.cross_entropy(hidden @ weight.T, target, reduction="none") * token_weight).sum(), weight)[0]
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)


def test_karma_shared_head_lm_losses_equal_the_separate_objectives(torch_one_thread):
    """karma_losses with generation and reconstruction on runs one weighted call on the tied head: the same
    total and parameter gradients as the two objectives computed alone (and their reported values)."""
    pytest.importorskip("transformers")
    import numpy as np

    from karma.losses import ObjectiveConfig, karma_losses
    from karma.model import make_batch
    from karma.train import ExperimentConfig, build_workspace

    ws = build_workspace(ExperimentConfig.tiny().replace(objectives={"backend": "torch"}))
    model, batch = ws.model, make_batch(ws.split.train, np.arange(6))
    params = [p for p in model.parameters() if p.requires_grad]

    def run(generation, reconstruction):
        objectives = ObjectiveConfig(action=0, generation=generation, reconstruction=reconstruction, image=0,
                                     backend="torch")
        losses = karma_losses(model, batch, objectives)
        grads = torch.autograd.grad(losses["total"], params, allow_unused=True)
        return losses, grads

    both, both_grads = run(0.5, 0.7)
    generation, generation_grads = run(0.5, 0)
    reconstruction, reconstruction_grads = run(0, 0.7)
    torch.testing.assert_close(both["generation"], generation["generation"].detach())
    torch.testing.assert_close(both["reconstruction"], reconstruction["reconstruction"].detach())
    torch.testing.assert_close(both["total"], generation["total"] + reconstruction["total"])
    for got, a, b in zip(both_grads, generation_grads, reconstruction_grads):
        want = None if a is None and b is None else (0 if a is None else a) + (0 if b is None else b)
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_torch_path_log_prob_of_an_underflowed_target():
    """Large logits: p_t underflows in the softmax (loss of hundreds of nats); log p_t comes from recomputed
    logits for those rows, the loss and gradients stay within the tolerance table."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 16, generator=gen, dtype=torch.float64) * 8
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64) * 8
    target = torch.randint(0, 50, (40,), generator=gen)

    def run(fn, dtype):
        leaves = [hidden.to(dtype, copy=True).requires_grad_(), weight.to(dtype, copy=True).requires_grad_()]
        loss = fn(*leaves, target, reduction="none")
        loss.sum().backward()
        return [loss.detach()] + [t.grad for t in leaves]

    ours = run(lambda *a, **k: linear_cross_entropy(*a, backend="torch", **k), torch.float32)
    truth = run(linear_cross_entropy_reference, torch.float64)
    plain = run(linear_cross_entropy_reference, torch.float32)
    assert truth[0].max() > 200  # some targets far below the row max: p_t = 0 in fp32
    for name, got, exact, baseline in zip(("loss", "grad_hidden", "grad_weight"), ours, truth, plain):
        assert_close_to_truth(name, got, exact, baseline, torch.float32)
