"""In-batch contrastive loss (InfoNCE / pairwise BPR / symmetric CLIP) without the B x M logit matrix."""
from .op import ContrastiveLoss, contrastive_loss

__all__ = ["ContrastiveLoss", "contrastive_loss"]
