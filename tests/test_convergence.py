"""Convergence: training the KARMA model with the fused ops gives the same loss curves (every objective, every
step) and the same weights as training with the naive reference ops.

Tolerance: fp32 training; the chunked paths sum in another order than the reference, and AdamW amplifies those
last-bit differences a little at every step, so curves must agree to CURVE_RTOL relative and the final weights to
WEIGHT_ATOL (a real gradient bug moves the very first step's loss or weights by far more).
"""
import pytest
import torch

pytest.importorskip("transformers")

from karma.train import ExperimentConfig, build_workspace, train  # noqa: E402

CURVE_RTOL = 1e-3
WEIGHT_ATOL = 1e-3
OBJECTIVES = ("action", "generation", "reconstruction", "image")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def run(backend: str, steps: int, action_mode: str = "softmax", batch_size: int = 16):
    config = ExperimentConfig.tiny().replace(
        objectives={"backend": backend, "action_mode": action_mode},
        train={"steps": steps, "pretrain_steps": 0, "log_every": 1, "warmup_steps": 1, "batch_size": batch_size})
    workspace = build_workspace(config)
    return train(workspace), workspace.model


def assert_same_training(fused, reference):
    (fused_history, fused_model), (reference_history, reference_model) = fused, reference
    assert len(fused_history) == len(reference_history)
    for step, (a, b) in enumerate(zip(fused_history, reference_history)):
        for name in OBJECTIVES + ("total",):
            assert a[name] == pytest.approx(b[name], rel=CURVE_RTOL), f"step {step} {name}: {a[name]} vs {b[name]}"
    for (name, a), (_, b) in zip(fused_model.named_parameters(), reference_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=WEIGHT_ATOL, msg=lambda m: f"{name}: {m}")
    # The curves must move: otherwise agreement says nothing.
    assert fused_history[-1]["total"] != pytest.approx(fused_history[0]["total"], rel=1e-3)


@pytest.mark.parametrize("action_mode", ["softmax", "pairwise"])
def test_torch_path_trains_like_the_reference(action_mode):
    assert_same_training(run("torch", 10, action_mode), run("reference", 10, action_mode))


def test_triton_path_trains_like_the_reference(triton_device):
    if triton_device != "cpu":
        pytest.skip("the model layer's tests run on CPU tensors (Triton under the interpreter)")
    # The interpreter runs about 1 ms per program instance: three steps of 8 windows (every position a query, so
    # ~50 queries) keep this in seconds.
    assert_same_training(run("triton", 3, batch_size=8), run("reference", 3, batch_size=8))


@pytest.mark.slow
def test_torch_path_long_run_tracks_the_reference():
    assert_same_training(run("torch", 60), run("reference", 60))
