"""The oracle for ``contrastive_loss``: naive, materialises the full B x M logit matrix, obviously right.

Semantics (this docstring is the documentation of the math)
-----------------------------------------------------------
Inputs: ``query`` [B, D], ``keys`` [M, D], ``target`` [B] int64 index into ``keys`` (default ``arange(B)``, which
needs M >= B), ``temperature`` T > 0 (python float or 0-d tensor), optional ``key_ids`` [M] int64, optional
``logq`` [M].

Logits, accumulated in float32 (float64 when the inputs are float64)::

    s_ij = (q_i . k_j) / T - logq_j                      (logq, when given, is subtracted after scaling)

False negatives: when ``key_ids`` is given, a key carrying the same id as the row's positive is not a negative::

    valid(i, j) = not (key_ids[j] == key_ids[target_i] and j != target_i)

The positive itself is always valid.

``mode="softmax"`` (InfoNCE)::

    loss_i = logsumexp_{j valid} s_ij - s_{i, target_i}

A row whose every negative is masked (or M == 1) has loss 0 and zero gradients: the softmax over the single
valid key is exactly 1.

``mode="pairwise"`` (BPR-style pairwise logistic, the KARMA paper's action loss)::

    loss_i = mean_{j valid, j != target_i} softplus(s_ij - s_{i, target_i})

and 0 (with zero gradients) when the row has no valid negative.

``mode="sigmoid"`` (SigLIP, open_clip's ``SigLipLoss``): every valid pair is a binary classification, the
positive labelled +1 and every other valid key -1, with a learnable ``bias`` b (python float or 0-d tensor)::

    loss_i = softplus(-(s_i,target_i + b)) + sum_{j valid, j != target_i} softplus(s_ij + b)

(reduction "mean" divides the sum over rows by B, like open_clip; SigLIP's parametrisation logit_scale = exp(t)
is temperature = exp(-t) here.) Sigmoid rows do not need a negative: a row with none keeps its positive term.

``symmetric=True`` (softmax only; target=None, so target_i = i; M >= B): the average of both directions. The
column direction is the softmax of column i over the queries, for the first B columns (the positives), on the
same logit matrix (logq is part of it) with the same mask rule transposed (with target = arange the mask is
symmetric)::

    col_loss_i = logsumexp_{r valid(r, i)} s_ri - s_ii
    loss_i     = (loss_i + col_loss_i) / 2

M == B is CLIP's loss; M = 2B (keys = B positives then B hard negatives) is sentence-transformers'
``MultipleNegativesSymmetricRankingLoss``: the hard negatives enter the query->key direction only.

``sample_weight`` [B] (TF-Recommenders): loss_i is multiplied by w_i before the reduction; "mean" is then
sum_i w_i loss_i / B (Keras' sum-over-batch-size; for a weighted average use "sum" and divide by sum(w)).
IEEE arithmetic: a weight of 0 on a NaN row gives NaN.

In the softmax and pairwise modes, rows with no valid negative (every other key masked as a false negative, or M == 1) have loss exactly 0 and zero
gradients whatever the query row holds (NaN included): the mask decides, not the arithmetic. Every backend
zeroes such query rows before the logits (``zero_rows_without_negative``), so a NaN there cannot reach the loss,
the key gradients or the temperature gradient.

Non-finite logits follow IEEE arithmetic on the formulas above, alike on every backend: ``logq_j = -inf`` (a key
with sampling probability 0) makes s_ij = +inf, so a row holding that key as a valid negative has loss +inf
(softmax: lse = +inf; pairwise: softplus(+inf) = +inf), the limit of the math as q_j -> 0; as the row's own
positive (all negatives finite) it gives softmax loss NaN (+inf - +inf, undefined) and pairwise loss 0
(softplus(-inf)); with a +inf negative as well, NaN in both modes. Gradients of an
infinite or NaN loss are not defined (NaN).

``reduction``: "mean" averages over all B rows (rows with no valid negative count, like ``F.cross_entropy``
without ``ignore_index``), "sum" adds them, "none" returns the [B] vector.

Output dtype: float32 for float16 / bfloat16 / float32 inputs, float64 for float64 inputs. Gradients have the
dtype of the tensor they belong to.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for half and single precision inputs, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_mask(key_ids: Optional[torch.Tensor], target: torch.Tensor, num_keys: int) -> Optional[torch.Tensor]:
    """[B, M] bool: True where key j may appear in row i's softmax (None: every key is valid)."""
    if key_ids is None:
        return None
    columns = torch.arange(num_keys, device=target.device)
    same_item = key_ids[None, :] == key_ids[target][:, None]
    return ~(same_item & (columns[None, :] != target[:, None]))


def rows_without_negative(key_ids: Optional[torch.Tensor], target: torch.Tensor,
                          num_keys: int) -> Optional[torch.Tensor]:
    """[B] bool: rows whose every key but the positive is masked (None: every row has a negative). O(M log M)."""
    if key_ids is None:
        return None if num_keys > 1 else torch.ones_like(target, dtype=torch.bool)
    sorted_ids = key_ids.sort().values
    positive_ids = key_ids[target]
    same = (torch.searchsorted(sorted_ids, positive_ids, right=True)
            - torch.searchsorted(sorted_ids, positive_ids, right=False))
    return same == num_keys  # every key carries the positive's id


def zero_rows_without_negative(query: torch.Tensor, key_ids: Optional[torch.Tensor], target: torch.Tensor,
                               num_keys: int) -> torch.Tensor:
    """The query with the rows that have no valid negative set to 0 (differentiably: their gradient is 0)."""
    empty = rows_without_negative(key_ids, target, num_keys)
    if empty is None:
        return query
    return torch.where(empty[:, None], torch.zeros((), dtype=query.dtype, device=query.device), query)


def contrastive_loss_reference(query: torch.Tensor, keys: torch.Tensor, target: Optional[torch.Tensor] = None,
                               temperature: Union[float, torch.Tensor] = 0.05, key_ids: Optional[torch.Tensor] = None,
                               logq: Optional[torch.Tensor] = None, mode: str = "softmax", symmetric: bool = False,
                               reduction: str = "mean", compute_dtype: Optional[torch.dtype] = None,
                               sample_weight: Optional[torch.Tensor] = None,
                               bias: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
    """Naive ``contrastive_loss`` (see the module docstring). Differentiable by autograd.

    ``compute_dtype`` overrides the accumulation dtype: tests use float64 for the truth and the input dtype for
    "what plain PyTorch gets in that dtype".
    """
    batch, num_keys = query.shape[0], keys.shape[0]
    dtype = compute_dtype or compute_dtype_for(query.dtype)
    if target is None:
        target = torch.arange(batch, device=query.device)
    target = target.long()
    if mode != "sigmoid":
        query = zero_rows_without_negative(query, None if key_ids is None else key_ids.long(), target, num_keys)
    if not isinstance(temperature, torch.Tensor):
        temperature = torch.tensor(temperature, dtype=dtype, device=query.device)
    logits = (query.to(dtype) @ keys.to(dtype).T) / temperature.to(dtype)
    if logq is not None:
        logits = logits - logq.to(dtype)[None, :]
    rows = torch.arange(batch, device=query.device)
    positive = logits[rows, target]
    valid = valid_mask(key_ids, target, num_keys)
    if mode == "softmax":
        masked = logits if valid is None else logits.masked_fill(~valid, float("-inf"))
        loss = torch.logsumexp(masked, dim=1) - positive
        if symmetric:
            column_loss = torch.logsumexp(masked[:, :batch], dim=0) - positive
            loss = (loss + column_loss) / 2
    elif mode == "pairwise":
        negative = torch.ones(batch, num_keys, dtype=torch.bool, device=query.device) if valid is None else valid
        negative[rows, target] = False
        margins = F.softplus(logits - positive[:, None])
        total = torch.where(negative, margins, torch.zeros((), dtype=dtype, device=query.device)).sum(dim=1)
        loss = total / negative.sum(dim=1).clamp_min(1).to(dtype)
    elif mode == "sigmoid":
        if bias is not None:
            logits = logits + (bias.to(dtype) if isinstance(bias, torch.Tensor) else bias)
        label = torch.full_like(logits, -1.0)
        label[rows, target] = 1.0
        terms = torch.logaddexp(-label * logits, torch.zeros((), dtype=dtype, device=query.device))  # softplus
        loss = (terms if valid is None else torch.where(valid, terms, torch.zeros((), dtype=dtype,
                                                                                   device=query.device))).sum(dim=1)
    else:
        raise ValueError(f"mode must be 'softmax', 'pairwise' or 'sigmoid', got {mode!r}")
    if sample_weight is not None:
        loss = loss * sample_weight.to(dtype)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
