"""The eager PyTorch baselines every GPU ratio is taken against ("torch_eager"), and the loss settings and headline
shapes the bench files and the GPU probe share: one definition each.

``eager_contrastive`` and ``eager_linear_ce`` are what a user writes without a fused op: the logits materialised
in the inputs' dtype (bf16 on a GPU: cuBLAS on the tensor cores), the loss in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.05
CONTRASTIVE_SHAPE = (65536, 256)  # B, D: Inf-CL's
LINEAR_CE_SHAPES = ((8192, 2304, 256000), (16384, 4096, 128256))  # N, D, V: CCE's (Gemma 2), Liger's (Llama 3)
TOPK_SHAPE = (16, 10000, 100)  # S, Q, k


def eager_contrastive(query: torch.Tensor, keys: torch.Tensor, mode: str = "softmax") -> torch.Tensor:
    """``mode``: "softmax" (InfoNCE, query -> keys), "symmetric" (both directions), "pairwise" (softplus over the
    logit differences to the positive)."""
    logits = (query @ keys.T).float() / TEMPERATURE
    target = torch.arange(query.shape[0], device=query.device)
    if mode == "softmax":
        return F.cross_entropy(logits, target)
    if mode == "symmetric":
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    positive = logits.diagonal()
    off_diagonal = ~torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    return (F.softplus(logits - positive[:, None]) * off_diagonal).sum(1).div(logits.shape[0] - 1).mean()


def eager_linear_ce(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), target)
