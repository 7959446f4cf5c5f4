"""ClipLoss against a direct implementation of open_clip's formula (written below: full logit matrices, gathers
through torch.distributed), in one process and on 2 real gloo processes, for every (local_loss,
gather_with_grad) combination: loss and the gradients of both feature sets and of a learnable logit scale.
"""
import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from karma_kernels.integrations.clip import ClipLoss, clip_loss
from tolerances import assert_close_to_truth

WORLD = 2
BATCH, DIM = 5, 8
COMBOS = list(itertools.product([False, True], [False, True]))  # (local_loss, gather_with_grad)


def open_clip_formula(image, text, logit_scale, local_loss=False, gather_with_grad=False, group=None):
    """open_clip's ClipLoss, spelled out: materialised logits, gathers as open_clip does them."""
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        logits_per_image = logit_scale * image @ text.T
        logits_per_text = logit_scale * text @ image.T
        labels = torch.arange(image.shape[0])
    else:
        rank = dist.get_rank(group)
        if gather_with_grad:
            all_image = torch.cat(torch.distributed.nn.functional.all_gather(image, group=group))
            all_text = torch.cat(torch.distributed.nn.functional.all_gather(text, group=group))
        else:
            gathered_image = [torch.zeros_like(image) for _ in range(world)]
            gathered_text = [torch.zeros_like(text) for _ in range(world)]
            dist.all_gather(gathered_image, image, group=group)
            dist.all_gather(gathered_text, text, group=group)
            if not local_loss:  # the local slice keeps its gradient
                gathered_image[rank] = image
                gathered_text[rank] = text
            all_image, all_text = torch.cat(gathered_image), torch.cat(gathered_text)
        if local_loss:
            logits_per_image = logit_scale * image @ all_text.T
            logits_per_text = logit_scale * text @ all_image.T
            labels = torch.arange(image.shape[0]) + image.shape[0] * rank
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(logits_per_image.shape[0])
    return (F.cross_entropy(logits_per_image.double(), labels)
            + F.cross_entropy(logits_per_text.double(), labels)) / 2


def _inputs(seed, rows=BATCH, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(rows, DIM, generator=generator, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(rows, DIM, generator=generator, dtype=torch.float64), dim=1)
    log_scale = torch.tensor(2.3, dtype=torch.float64)  # open_clip's learnable parameter; the loss gets its exp
    return [t.to(dtype).requires_grad_(True) for t in (image, text, log_scale)]


def _loss_and_grads(fn, image, text, log_scale, **options):
    loss = fn(image, text, log_scale.exp(), **options)
    loss.backward()
    return loss.detach(), [t.grad for t in (image, text, log_scale)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_process_matches_open_clip(dtype):
    truth_loss, truth_grads = _loss_and_grads(open_clip_formula, *_inputs(0))
    torch_loss, torch_grads = _loss_and_grads(open_clip_formula, *_inputs(0, dtype=dtype))
    our_loss, our_grads = _loss_and_grads(ClipLoss(), *_inputs(0, dtype=dtype))
    assert_close_to_truth("loss", our_loss, truth_loss, torch_loss, dtype)
    for name, ours, truth, same in zip(("image", "text", "logit_scale"), our_grads, truth_grads, torch_grads):
        assert_close_to_truth(f"d{name}", ours, truth, same, dtype)


def test_module_contract():
    image, text, log_scale = _inputs(1)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    out = ClipLoss()(image, text, log_scale.exp(), logit_bias=bias, output_dict=True)
    torch.testing.assert_close(out["contrastive_loss"], clip_loss(image, text, log_scale.exp()))
    out["contrastive_loss"].backward()
    assert bias.grad is not None and bias.grad.item() == 0.0  # a scalar bias cancels in the softmax
    torch.testing.assert_close(clip_loss(image, text, 10.0), open_clip_formula(image, text, 10.0))
    with pytest.raises(ValueError, match="logit_scale"):
        clip_loss(image, text, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(image, text[:3], 10.0)
    with pytest.raises(ValueError, match="horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="initialised"):
        ClipLoss(world_size=2)(image, text, 10.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    for local_loss, gather_with_grad in COMBOS:
        for name, fn in (("ours", ClipLoss(local_loss, gather_with_grad, rank=rank, world_size=WORLD)),
                         ("open_clip", lambda *a: open_clip_formula(*a, local_loss=local_loss,
                                                                    gather_with_grad=gather_with_grad,
                                                                    group=dist.group.WORLD))):
            results[(local_loss, gather_with_grad, name)] = _loss_and_grads(fn, *_inputs(10 + rank))
    # an explicit group is honoured and a wrong rank is refused
    group = dist.new_group(ranks=list(range(WORLD)))
    results["explicit_group"] = _loss_and_grads(ClipLoss(True, True, process_group=group), *_inputs(10 + rank))
    try:
        ClipLoss(rank=1 - rank, world_size=WORLD)(*_inputs(10 + rank)[:2], 10.0)
    except ValueError as exc:
        results["bad_rank"] = str(exc)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("clip_dist"))
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("local_loss,gather_with_grad", COMBOS)
def test_two_ranks_match_open_clip(two_rank_results, local_loss, gather_with_grad):
    for rank, results in enumerate(two_rank_results):
        our_loss, our_grads = results[(local_loss, gather_with_grad, "ours")]
        truth_loss, truth_grads = results[(local_loss, gather_with_grad, "open_clip")]
        tag = f"rank {rank} local_loss={local_loss} gather_with_grad={gather_with_grad}"
        assert_close_to_truth(f"{tag} loss", our_loss, truth_loss, truth_loss, torch.float64)
        for name, ours, truth in zip(("image", "text", "logit_scale"), our_grads, truth_grads):
            assert_close_to_truth(f"{tag} d{name}", ours, truth, truth, torch.float64)


def test_two_ranks_gradients_cross_ranks_only_when_asked(two_rank_results):
    results = two_rank_results[0]
    with_grad = results[(True, True, "ours")][1][0]
    without = results[(True, False, "ours")][1][0]
    # the other rank's text->image term reaches this rank's images only through a differentiable gather
    assert (with_grad - without).abs().max() > 1e-3
    explicit_loss, explicit_grads = results["explicit_group"]
    torch.testing.assert_close(explicit_loss, results[(True, True, "ours")][0], rtol=0, atol=0)
    for got, want in zip(explicit_grads, results[(True, True, "ours")][1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "disagree with the process group" in results["bad_rank"]
