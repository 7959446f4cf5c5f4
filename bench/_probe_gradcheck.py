"""The GPU probe's gradient check (bench/gpu_probe.py): fp16 gradients of both losses at B = N = 8192 through the
public API, against a float64 truth (the reference on upcast inputs), beside eager fp16 torch's, judged by the
test suite's tolerance rule (tests/tolerances.py: err <= K * err(torch fp16) + EPS)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._baselines import TEMPERATURE, eager_contrastive, eager_linear_ce

REPO = Path(__file__).resolve().parents[1]


def _tolerance(dtype):
    """The test suite's rule (K, EPS, rel_err of tests/tolerances.py), loaded from its file: a ``tests`` package
    some other distribution installed must not shadow it."""
    path = REPO / "tests" / "tolerances.py"
    if not path.is_file():
        return None, None, lambda x, truth: float((x.double() - truth.double()).abs().max()
                                                  / truth.double().abs().max().clamp_min(1e-30))
    spec = importlib.util.spec_from_file_location("karma_test_tolerances", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.K[dtype], module.EPS[dtype], module.rel_err


def _grads(loss_fn, tensors, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def section_grad_check(p) -> None:
    from karma_kernels import contrastive_loss, linear_cross_entropy
    from karma_kernels.contrastive.reference import contrastive_loss_reference
    from karma_kernels.linear_ce.reference import linear_cross_entropy_reference

    k_mult, eps, rel_err = _tolerance(torch.float16)
    backend = "torch" if p.rehearsal else "triton"
    b, dim = (64, 32) if p.rehearsal else (8192, 256)
    n, d, v = (64, 32, 300) if p.rehearsal else (8192, 1024, 32000)
    q, k = (F.normalize(torch.randn(b, dim, device=p.device, dtype=torch.float64), dim=1) for _ in range(2))
    h = torch.randn(n, d, device=p.device, dtype=torch.float64)
    w = torch.randn(v, d, device=p.device, dtype=torch.float64) / d**0.5
    t = torch.randint(0, v, (n,), device=p.device)
    checks = (
        ("contrastive", f"B={b},M={b},D={dim}", ("loss", "d_query", "d_keys"), (q, k),
         lambda x, y: contrastive_loss(x, y, temperature=TEMPERATURE, backend=backend),
         lambda x, y: contrastive_loss_reference(x, y, None, TEMPERATURE), eager_contrastive),
        ("linear_ce", f"N={n},D={d},V={v}", ("loss", "d_hidden", "d_weight"), (h, w),
         lambda x, y: linear_cross_entropy(x, y, t, backend=backend),
         lambda x, y: linear_cross_entropy_reference(x, y, t),
         lambda x, y: eager_linear_ce(x, y, t)),
    )
    for op, shape, names, inputs, ours, reference, eager in checks:
        truth = _grads(reference, inputs, torch.float64)
        kernel = _grads(ours, inputs, torch.float16)
        torch_fp16 = _grads(eager, inputs, torch.float16)
        for name, ours_value, true_value, torch_value in zip(names, kernel, truth, torch_fp16):
            err, base = rel_err(ours_value, true_value), rel_err(torch_value, true_value)
            bound = k_mult * base + eps if k_mult is not None else None
            p.emit(kind="grad_check", section="grad_check", op=op, impl=backend, shape=shape, dtype="float16",
                   tensor=name, err=err, err_torch_fp16=base, bound=bound,
                   ok=(err <= bound) if bound is not None else None, rule="err <= K * err_torch_fp16 + EPS "
                   "(tests/tolerances.py); err = max |x - truth| / max |truth|, truth = reference in float64")
        del truth, kernel, torch_fp16
