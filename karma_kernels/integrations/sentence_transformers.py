"""sentence-transformers: ``MultipleNegativesRankingLoss`` and its symmetric variant computed by ``contrastive_loss``.

    from karma_kernels.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)            # was: losses.MultipleNegativesRankingLoss(model)

The classes subclass sentence-transformers' own, so the constructor, ``forward(sentence_features, labels)``,
``get_config_dict``, model cards and the trainer see the same loss; only the score matrix is never formed. The math,
for columns (anchor, positive, negative_1, ..., negative_n), each [B, D]:

    docs  = [positive; negative_1; ...; negative_n]                      ((n + 1) B keys; the hard negatives)
    q, k  = normalize(anchor), normalize(docs)      with similarity_fct = cos_sim (dot_score: no normalisation)
    loss  = contrastive_loss(q, k, temperature=1 / scale)                 (query i's positive is key i)

The symmetric variant (directions ("query_to_doc", "doc_to_query"), partition_mode "per_direction") averages that
row loss with the column loss of each positive against every anchor, per row, then over rows. With
``gather_across_devices=True`` the keys (and, for the symmetric term, the anchors) of every rank join the
softmax through ``contrastive_loss(process_group=...)``.

Other options of the upstream class (other similarity functions, the query_to_query / doc_to_doc directions,
hardness weighting) raise ValueError at construction.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer import losses as _st_losses
from sentence_transformers.util import cos_sim, dot_score

from ..contrastive.op import contrastive_loss

_FORWARD = ("query_to_doc",)
_SYMMETRIC = ("query_to_doc", "doc_to_query")


def _world_group():
    """The default process group when one is initialised with more than one rank, else None (no gathering)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def ranking_loss(embeddings, *, scale: float, normalize: bool, symmetric: bool, process_group=None,
                 backend: str = "auto") -> torch.Tensor:
    """The loss of the module docstring from the column embeddings [anchor, positive, negatives...]."""
    if len(embeddings) < 2:
        raise ValueError(f"MultipleNegativesRankingLoss: expected at least 2 columns (anchor, positive), "
                         f"got {len(embeddings)}")
    if normalize:
        embeddings = [F.normalize(e, p=2, dim=-1) for e in embeddings]
    queries, positives = embeddings[0], embeddings[1]
    docs = torch.cat(embeddings[1:], dim=0) if len(embeddings) > 2 else positives
    options = dict(temperature=1.0 / scale, backend=backend, process_group=process_group)
    if not symmetric:
        return contrastive_loss(queries, docs, **options)
    if len(embeddings) == 2:
        return contrastive_loss(queries, docs, symmetric=True, **options)  # both directions from one tile pass
    # hard negatives join the row softmax only; the column of positive i runs over the anchors
    rows = contrastive_loss(queries, docs, reduction="none", **options)
    columns = contrastive_loss(positives, queries, reduction="none", **options)
    return ((rows + columns) / 2).mean()


class MultipleNegativesRankingLoss(_st_losses.MultipleNegativesRankingLoss):
    """Drop-in for ``sentence_transformers.losses.MultipleNegativesRankingLoss`` (see the module docstring).

    Extra keyword: ``backend`` ("auto", "triton", "torch", "reference"), passed to ``contrastive_loss``.
    """

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim, gather_across_devices: bool = False,
                 directions=_FORWARD, partition_mode: str = "joint", hardness_mode: Optional[str] = None,
                 hardness_strength: float = 0.0, *, backend: str = "auto") -> None:
        name = type(self).__name__
        if similarity_fct is not cos_sim and similarity_fct is not dot_score:
            raise ValueError(f"{name}: similarity_fct must be sentence_transformers.util.cos_sim or dot_score "
                             f"(the fused loss computes dot products of, optionally, normalised embeddings), got "
                             f"{getattr(similarity_fct, '__name__', similarity_fct)!r}")
        directions = tuple(directions)
        symmetric = sorted(directions) == sorted(_SYMMETRIC) and partition_mode == "per_direction"
        if directions != _FORWARD and not symmetric:
            raise ValueError(f"{name}: supports directions=('query_to_doc',) or ('query_to_doc', 'doc_to_query') "
                             f"with partition_mode='per_direction', got directions={directions}, "
                             f"partition_mode={partition_mode!r}")
        if hardness_mode is not None:
            raise ValueError(f"{name}: hardness_mode is not supported by the fused loss, got {hardness_mode!r}")
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, hardness_mode=None, hardness_strength=hardness_strength)
        self.symmetric = symmetric
        self.backend = backend

    def compute_loss_from_embeddings(self, embeddings, labels) -> torch.Tensor:
        return ranking_loss(list(embeddings), scale=float(self.scale), normalize=self.similarity_fct is cos_sim,
                            symmetric=self.symmetric,
                            process_group=_world_group() if self.gather_across_devices else None,
                            backend=self.backend)


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """Drop-in for ``sentence_transformers.losses.MultipleNegativesSymmetricRankingLoss``: the mean of the
    anchor->documents and positive->anchors losses (hard-negative columns join the first only)."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim, gather_across_devices: bool = False, *,
                 backend: str = "auto") -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=_SYMMETRIC,
                         partition_mode="per_direction", backend=backend)
