"""CLIP-style training: ``ClipLoss`` with open_clip's semantics, computed by ``contrastive_loss``.

    from karma_kernels.integrations.clip import ClipLoss
    loss = ClipLoss(local_loss=True, gather_with_grad=True)(image_features, text_features, logit_scale)

The constructor and call mirror open_clip's ``ClipLoss``; the [N, N] logit matrices are never formed. With
``s = logit_scale`` (already exponentiated, as the model returns it; a tensor that requires grad learns) and
features of B pairs on each of W ranks (N = W B in all, this rank's rows starting at ``offset``):

    one process:                 (CE(s I T^T, arange B) + CE(s T I^T, arange B)) / 2           (= symmetric InfoNCE)
    W > 1, local_loss=False:     the same on the gathered I_all, T_all (every rank computes the global loss)
    W > 1, local_loss=True:      (CE(s I T_all^T, offset + arange B) + CE(s T I_all^T, offset + arange B)) / 2

``gather_with_grad=True``: the gathered features carry gradients back to the rank that owns them (summed over
ranks). ``False``: the gathered copies are constants, except that with ``local_loss=False`` this rank's own
slice is its live features (open_clip's rule). A scalar ``logit_bias`` shifts every logit of a row alike and
cancels in both softmaxes; it is accepted and receives a zero gradient.

Ranks come from ``process_group`` (default: the default group when ``world_size > 1``); open_clip's explicit
``rank``/``world_size`` arguments are checked against it. Horovod is not supported.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..contrastive.distributed import all_gather_rows
from ..contrastive.op import contrastive_loss

_OP = "ClipLoss"


def _group_world_rank(process_group, world_size: int, rank: int):
    """(group, world, rank) to use; (None, 1, 0) for single-process training."""
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if process_group is None and world_size > 1:
        if not initialized:
            raise ValueError(f"{_OP}: world_size={world_size} needs an initialised torch.distributed process group")
        process_group = dist.group.WORLD
    if process_group is None or not initialized:
        return None, 1, 0
    world, own = dist.get_world_size(process_group), dist.get_rank(process_group)
    if world_size > 1 and (world_size, rank) != (world, own):
        raise ValueError(f"{_OP}: rank={rank}, world_size={world_size} disagree with the process group "
                         f"(rank {own} of {world})")
    return process_group, world, own


def _gather(features: Tensor, group, with_grad: bool, keep_own: bool):
    """All ranks' features in rank order and this rank's offset. Without grad the copies are constants; with
    ``keep_own`` this rank's slice is then its live (differentiable) features."""
    if with_grad:
        return all_gather_rows(features, process_group=group)
    gathered, offset = all_gather_rows(features.detach(), process_group=group)
    if keep_own:
        gathered = torch.cat([gathered[:offset], features, gathered[offset + features.shape[0]:]])
    return gathered, offset


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor], *,
              local_loss: bool = False, gather_with_grad: bool = False, process_group=None,
              backend: str = "auto") -> Tensor:
    """Functional form of :class:`ClipLoss` (see the module docstring); ``process_group=None``: one process."""
    if isinstance(logit_scale, Tensor):
        temperature = 1.0 / logit_scale.reshape(())
    elif isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, bool) and logit_scale > 0:
        temperature = 1.0 / float(logit_scale)
    else:
        raise ValueError(f"{_OP}: logit_scale must be a positive number or a 0-d tensor, got {logit_scale!r}")
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"{_OP}: image_features and text_features must both be [B, D] with the same shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    options = dict(temperature=temperature, backend=backend)
    if process_group is None:
        return contrastive_loss(image_features, text_features, symmetric=True, **options)
    all_images, offset = _gather(image_features, process_group, gather_with_grad, keep_own=not local_loss)
    all_texts, _ = _gather(text_features, process_group, gather_with_grad, keep_own=not local_loss)
    if not local_loss:
        return contrastive_loss(all_images, all_texts, symmetric=True, **options)
    target = torch.arange(image_features.shape[0], device=image_features.device) + offset
    image_to_text = contrastive_loss(image_features, all_texts, target, **options)
    text_to_image = contrastive_loss(text_features, all_images, target, **options)
    return (image_to_text + text_to_image) / 2


class ClipLoss(nn.Module):
    """open_clip-compatible CLIP loss (see the module docstring).

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`` returns the loss,
    or ``{"contrastive_loss": loss}`` with ``output_dict=True``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, process_group=None,
                 backend: str = "auto"):
        super().__init__()
        if use_horovod:
            raise ValueError(f"{_OP}: use_horovod=True is not supported; pass a torch.distributed process_group")
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = cache_labels  # accepted for compatibility: no label tensor is kept
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor],
                logit_bias: Optional[Tensor] = None, output_dict: bool = False):
        group, _, _ = _group_world_rank(self.process_group, self.world_size, self.rank)
        loss = clip_loss(image_features, text_features, logit_scale, local_loss=self.local_loss,
                         gather_with_grad=self.gather_with_grad, process_group=group, backend=self.backend)
        if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
            loss = loss + 0.0 * logit_bias.sum()  # cancels in the softmax: a zero gradient, as open_clip gives
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}"
