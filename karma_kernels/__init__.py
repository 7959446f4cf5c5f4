"""karma_kernels: fused ops for KARMA-style LLM recommendation training.

Public API (mirrors torch.nn.functional):
    contrastive_loss, ContrastiveLoss                 in-batch contrastive (InfoNCE / pairwise / SigLIP) loss
    linear_cross_entropy, LinearCrossEntropyLoss      fused LM head + cross-entropy
    prefix_reconstruction_loss                        decode text from an embedding prefix
    topk_merge                                        merge top-k results of sharded ANN searches

Each op takes ``backend="auto" | "triton" | "torch" | "reference"`` (see ``karma_kernels._backend``).
Importing this package never queries devices and never imports transformers or faiss.
"""
from .contrastive.op import ContrastiveLoss, contrastive_loss
from .linear_ce.op import LinearCrossEntropyLoss, linear_cross_entropy, prefix_reconstruction_loss
from .topk_merge.op import topk_merge

__all__ = [
    "contrastive_loss",
    "ContrastiveLoss",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "prefix_reconstruction_loss",
    "topk_merge",
]
__version__ = "0.1.0"
