"""Vocabulary-parallel linear_cross_entropy (process_group=) on 2 real processes (gloo on CPU): each rank holds
half of the LM head's rows; every rank's loss, lse and hidden gradient equal the unsharded op's, its weight and
bias gradients equal the matching slice (float64 reference as the truth, tests/tolerances.py as the bound)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce.reference import linear_cross_entropy_reference
from tests.tolerances import assert_close_to_truth

WORLD = 2
TOKENS, SEQ, DIM, VOCAB = 4, 5, 8, 14
CASES = {
    # name: (backend, options, weight of lse^2 in the objective)
    "torch_mean_z_softcap": ("torch", dict(z_loss=1e-2, softcap=4.0), 0.1),
    "torch_none": ("torch", dict(reduction="none"), 0.0),
    "torch_sum_shift": ("torch", dict(reduction="sum", shift=1, z_loss=1e-3), 0.0),
    "reference_mean": ("reference", dict(softcap=3.0), 0.05),
    "triton_mean_z": ("triton", dict(z_loss=1e-2), 0.1),
}


def _inputs():
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(TOKENS, SEQ, DIM, generator=gen)
    weight = torch.randn(VOCAB, DIM, generator=gen) / DIM ** 0.5
    bias = torch.randn(VOCAB, generator=gen)
    target = torch.randint(0, VOCAB, (TOKENS, SEQ), generator=gen)
    target[0, :3] = torch.tensor([0, 6, 7])  # both shards' edges
    target[1, 2] = -100
    upstream = torch.rand(TOKENS, SEQ, generator=gen) + 0.5
    return hidden, weight, bias, target, upstream


def _objective(fn, hidden, weight, bias, target, upstream, options, lse_weight, **extra):
    loss, lse = fn(hidden, weight, target, bias=bias, return_lse=True, **options, **extra)
    total = (loss * upstream).sum() if loss.dim() else loss
    return loss, lse, total + lse_weight * lse.square().mean()


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    hidden, weight, bias, target, upstream = _inputs()
    shard = slice(rank * VOCAB // WORLD, (rank + 1) * VOCAB // WORLD)
    results = {}
    for name, (backend, options, lse_weight) in CASES.items():
        leaves = [hidden.clone().requires_grad_(), weight[shard].clone().requires_grad_(),
                  bias[shard].clone().requires_grad_()]
        loss, lse, total = _objective(linear_cross_entropy, *leaves, target, upstream, options, lse_weight,
                                      backend=backend, process_group=dist.group.WORLD)
        total.backward()
        results[name] = dict(loss=loss.detach(), lse=lse.detach(), grads=[t.grad for t in leaves])
    try:
        linear_cross_entropy(hidden, weight[shard], target, label_smoothing=0.1, process_group=dist.group.WORLD)
    except ValueError as exc:
        results["refused"] = str(exc)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("vocab_parallel"))
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _reference_fn(hidden, weight, target, *, shift=0, **options):
    if shift:
        hidden, target = hidden[:, :-shift], target[:, shift:]
    loss, lse = linear_cross_entropy_reference(hidden, weight, target, **options)
    if shift and options.get("reduction") == "none":
        loss = torch.nn.functional.pad(loss, (0, shift))
    if shift:
        lse = torch.nn.functional.pad(lse, (0, shift))
    return loss, lse


@pytest.mark.parametrize("name", list(CASES))
def test_vocab_parallel_equals_the_unsharded_op(ranks, name):
    backend, options, lse_weight = CASES[name]
    hidden, weight, bias, target, upstream = _inputs()
    truth_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    truth_loss, truth_lse, total = _objective(_reference_fn, *truth_leaves, target, upstream.double(), options,
                                              lse_weight)
    total.backward()
    plain_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    plain_loss, plain_lse, total = _objective(linear_cross_entropy, *plain_leaves, target, upstream, options,
                                              lse_weight, backend="torch")
    total.backward()
    for rank, result in enumerate(ranks):
        shard = slice(rank * VOCAB // WORLD, (rank + 1) * VOCAB // WORLD)
        label = f"{name} rank {rank}"
        assert_close_to_truth(f"{label} loss", result[name]["loss"], truth_loss, plain_loss, torch.float32)
        assert_close_to_truth(f"{label} lse", result[name]["lse"], truth_lse, plain_lse, torch.float32)
        for which, got, truth, plain in zip(("hidden", "weight", "bias"), result[name]["grads"],
                                            [t.grad for t in truth_leaves], [t.grad for t in plain_leaves]):
            part = slice(None) if which == "hidden" else shard
            assert_close_to_truth(f"{label} d{which}", got, truth[part], plain[part], torch.float32)


def test_vocab_parallel_refuses_label_smoothing(ranks):
    assert all("label_smoothing > 0 is not supported with process_group" in r["refused"] for r in ranks)
