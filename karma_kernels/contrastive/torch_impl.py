"""Memory-efficient PyTorch path of ``contrastive_loss`` (the path CPU users get).

The B x M logit matrix is never held whole: query rows are processed in chunks whose chunk x M float32 block fits
``CHUNK_BYTES``. Semantics are those of ``reference.py``.

Gradients. With s_ij = (q_i . k_j) / T - logq_j and G_ij = d loss / d s_ij (upstream scale included)::

    dq_i = sum_j G_ij k_j / T        dk_j = sum_i G_ij q_i / T
    dlogq_j = -sum_i G_ij            dT = -(1/T) sum_i q_i . dq_i

(the last identity gives the temperature gradient from dq without another pass over the logits). Every G used
here is a row-scaled matrix part plus one entry per row at the row's target column::

    G_ij = a_i P_ij - e_i [j == target_i]

so the row scale a_i and the target-column term are applied on the small chunk x D products, never on the
chunk x M block. When the upstream gradient is uniform (reduction "mean"/"sum") and gradients are wanted,
``contrastive_forward`` forms them in the same chunk pass as the loss (no recompute; backward only scales them).
For reduction "none" ``contrastive_backward`` recomputes chunk-wise from the saved per-row statistics.

Saved statistics ``stats`` [5, B] in the compute dtype (``STATS_ROWS``; rows not listed are 0):
  softmax:  [row shift m_i, column shift (symmetric only), target logit s_i,target, row log-sum l_i,
             column log-sum (symmetric only)]
  pairwise: [target logit s_i,target, 1 / (number of valid negatives) (0 when none),
             sum_j sigmoid(s_ij - s_i,target) / (number of valid negatives)]
  sigmoid:  [target logit s_i,target]

A softmax lse is kept as two numbers, the shift m (the max; 0 once it is +inf, so the lse is +inf, not NaN) and
l = log(sum_j exp(s_ij - m)), never rounded into one: the backward's a_i P_ij = exp(s_ij - m_i) * (a_i exp(-l_i))
(``probability_factors``) then carries the rounding of l (~ulp(log M)) as torch's log_softmax does, not that of a
float32 lse (~ulp(|lse|), 4-8x more at small temperatures), and so does the temperature gradient, a cancelling
sum of such terms. The loss is (m_i - s_i,target) + l_i (the first difference is exact when the positive is near
the max).

Symmetric with M > B keys (hard negatives after the B positives): the column direction covers the first B
columns only, so column statistics and the column part of G are kept for those.

Sigmoid mode: the op folds the bias into logq (s + b = q.k / T - (logq - b)), so here it is logq; with the target
column at -inf in the block, G = a_i sigmoid(s_ij) - a_i sigmoid(-s_i,target) [j == target_i].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .reference import compute_dtype_for

# Budget of one chunk x M block of logits (the working set of the chunk loop).
CHUNK_BYTES = 64 * 2**20
# rows of the saved statistics (layout in the module docstring), the same for every mode and backend
STATS_ROWS = 5

Grads = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass
class _Problem:
    query: torch.Tensor            # [B, D] compute dtype
    query_scaled: torch.Tensor     # [B, D] query / T, so a logit block is one matmul
    keys: torch.Tensor             # [M, D] compute dtype
    target: torch.Tensor           # [B] int64
    positive_ids: Optional[torch.Tensor]  # [B] key_ids[target]
    key_ids: Optional[torch.Tensor]       # [M]
    logq: Optional[torch.Tensor]          # [M] compute dtype
    inv_temperature: torch.Tensor         # 0-d compute dtype
    mode: str
    symmetric: bool
    chunk: int

    @property
    def batch(self) -> int:
        return self.query.shape[0]

    @property
    def num_keys(self) -> int:
        return self.keys.shape[0]


def _prepare(query, keys, target, temperature, key_ids, logq, mode, symmetric, chunk_rows=None) -> _Problem:
    dtype = compute_dtype_for(query.dtype)
    q = query.detach().to(dtype)
    inv_t = 1.0 / temperature.detach().to(device=query.device, dtype=dtype)
    num_keys = keys.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (num_keys * torch.finfo(dtype).bits // 8))
    target = target.long()
    return _Problem(
        query=q, query_scaled=q * inv_t, keys=keys.detach().to(dtype), target=target,
        positive_ids=None if key_ids is None else key_ids[target], key_ids=key_ids,
        logq=None if logq is None else logq.detach().to(dtype), inv_temperature=inv_t,
        mode=mode, symmetric=symmetric, chunk=min(chunk_rows, query.shape[0]))


def _logits_chunk(p: _Problem, r0: int, r1: int, buffer: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logits of rows r0:r1 with invalid (false-negative) entries at -inf; returns (block, invalid mask)."""
    block = buffer[: r1 - r0]
    torch.mm(p.query_scaled[r0:r1], p.keys.T, out=block)
    if p.logq is not None:
        block.sub_(p.logq)
    invalid = None
    if p.key_ids is not None:
        invalid = p.key_ids[None, :] == p.positive_ids[r0:r1, None]
        invalid[torch.arange(r1 - r0, device=block.device), p.target[r0:r1]] = False
        block.masked_fill_(invalid, float("-inf"))
    return block, invalid


def _target_logits(block: torch.Tensor, target_chunk: torch.Tensor) -> torch.Tensor:
    return block.gather(1, target_chunk[:, None]).squeeze(1)


def finite_shift(running_max: torch.Tensor) -> torch.Tensor:
    """The shift a logsumexp subtracts: the max, or 0 where it is not finite (a +inf logit, logq = -inf: the sum
    and so the lse become +inf as in reference.py, not inf - inf = NaN; a column with no valid entry: sum 0)."""
    return torch.where(torch.isfinite(running_max), running_max, torch.zeros_like(running_max))


def probability_factors(shift: torch.Tensor, log_sum: torch.Tensor,
                        coef: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(shift', coef * exp(-l)) with coef * P_ij = exp(s_ij - shift') * coef * exp(-l) (both backends' backward:
    the factor joins a coefficient, so the lse m + l is never rounded into one float32). shift' is +inf where
    l = +inf (a +inf logit, shift 0): P is then 0 for finite s and NaN for s = +inf, as exp(s - lse) gives,
    not exp(s) * 0 (NaN once exp(s) overflows)."""
    return torch.where(log_sum == float("inf"), log_sum, shift), coef * torch.exp(-log_sum)


def _exp_in_place(block: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn logits into exp(s_ij - m_i) in place (probabilities up to the row factor 1 / row_sum);
    returns (row shift m, row log-sum l, row_sum). Leaving the normalisation to the caller saves a pass over
    the block."""
    shift = finite_shift(block.amax(dim=1))
    block.sub_(shift[:, None]).exp_()
    row_sum = block.sum(dim=1)
    return shift, row_sum.log(), row_sum


def _update_column_stats(block: torch.Tensor, col_max: torch.Tensor, col_sum: torch.Tensor) -> None:
    """Online column max / sum-exp over row chunks (consumes ``block``)."""
    new_max = torch.maximum(col_max, block.amax(dim=0))
    shift = finite_shift(new_max)   # a column fully masked so far: exp() gives 0, not NaN
    col_sum.mul_(torch.exp(col_max - shift)).add_(block.sub_(shift).exp_().sum(dim=0))
    col_max.copy_(new_max)


class _GradAccumulator:
    """dq, dk, dlogq accumulated chunk by chunk from G = a_i P_ij - e_i [j == target_i]."""

    def __init__(self, p: _Problem, want_logq: bool):
        self.p = p
        self.dq = torch.empty_like(p.query)
        self.dk = torch.zeros_like(p.keys)
        self.dlogq = torch.zeros(p.num_keys, dtype=p.query.dtype, device=p.query.device) if want_logq else None

    def add(self, r0: int, r1: int, probs: torch.Tensor, row_scale: Optional[torch.Tensor],
            target_coef: torch.Tensor) -> None:
        p = self.p
        target = p.target[r0:r1]
        q_scaled = p.query_scaled[r0:r1]
        dq = self.dq[r0:r1]
        torch.mm(probs, p.keys, out=dq)
        if row_scale is not None:
            dq.mul_(row_scale[:, None])
            self.dk.addmm_(probs.T, q_scaled * row_scale[:, None])
        else:
            self.dk.addmm_(probs.T, q_scaled)
        dq.sub_(target_coef[:, None] * p.keys[target]).mul_(p.inv_temperature)
        # index_put_ with accumulate (repeated targets add up) is ~10x faster than index_add_ on CPU here
        self.dk.index_put_((target,), q_scaled * (-target_coef[:, None]), accumulate=True)
        if self.dlogq is not None:
            column_sum = torch.mv(probs.T, row_scale) if row_scale is not None else probs.sum(dim=0)
            self.dlogq.sub_(column_sum).index_put_((target,), target_coef, accumulate=True)

    def finish(self) -> Grads:
        dtemperature = -(self.p.query * self.dq).sum() * self.p.inv_temperature
        return self.dq, self.dk, dtemperature, self.dlogq


def _pairwise_chunk(p: _Problem, r0: int, r1: int, block: torch.Tensor, invalid: Optional[torch.Tensor],
                    scratch: torch.Tensor):
    """Pairwise loss of rows r0:r1; leaves sigmoid(s_ij - s_it) over valid negatives in ``block``."""
    rows = torch.arange(r1 - r0, device=block.device)
    target = p.target[r0:r1]
    positive = _target_logits(block, target)
    block[rows, target] = float("-inf")  # the positive is not its own negative
    block.sub_(positive[:, None])
    if invalid is None:
        count = torch.full((r1 - r0,), p.num_keys - 1, dtype=block.dtype, device=block.device)
    else:
        count = (p.num_keys - 1 - invalid.sum(dim=1)).to(block.dtype)
    inv_count = torch.where(count > 0, 1.0 / count.clamp_min(1), torch.zeros_like(count))
    margins = torch.ops.aten.softplus.out(block, 1, 20, out=scratch[: r1 - r0])
    loss = margins.sum(dim=1) * inv_count
    block.sigmoid_()
    sigmoid_mean = block.sum(dim=1) * inv_count
    return loss, positive, inv_count, sigmoid_mean


def _sigmoid_chunk(p: _Problem, r0: int, r1: int, block: torch.Tensor, scratch: torch.Tensor):
    """Sigmoid-mode loss of rows r0:r1; leaves sigmoid(s_ij) (target column 0) in ``block`` and returns
    (loss, target logit, sigmoid(-target logit))."""
    rows = torch.arange(r1 - r0, device=block.device)
    target = p.target[r0:r1]
    positive = _target_logits(block, target)
    block[rows, target] = float("-inf")  # the positive's term is softplus(-s), added below
    zero = torch.zeros((), dtype=block.dtype, device=block.device)  # softplus(x) = logaddexp(x, 0), exactly
    loss = torch.logaddexp(block, zero, out=scratch[: r1 - r0]).sum(dim=1) + torch.logaddexp(-positive, zero)
    block.sigmoid_()
    return loss, positive, torch.sigmoid(-positive)


def contrastive_forward(query, keys, target, temperature, key_ids, logq, mode, symmetric,
                        grad_row_coef: Optional[float] = None, want_logq_grad: bool = False,
                        chunk_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, Optional[Grads]]:
    """Per-row loss [B], statistics [STATS_ROWS, B] and, when ``grad_row_coef`` is given, the gradients of
    ``sum_i grad_row_coef * loss_i`` (a uniform upstream gradient: reduction "mean" or "sum")."""
    p = _prepare(query, keys, target, temperature, key_ids, logq, mode, symmetric, chunk_rows)
    batch, num_keys, dtype, device = p.batch, p.num_keys, p.query.dtype, p.query.device
    buffer = torch.empty(p.chunk, num_keys, dtype=dtype, device=device)
    loss = torch.empty(batch, dtype=dtype, device=device)
    stats = torch.zeros(STATS_ROWS, batch, dtype=dtype, device=device)
    fused_grads = grad_row_coef is not None and not symmetric
    acc = _GradAccumulator(p, want_logq_grad) if fused_grads else None

    if mode == "sigmoid":
        scratch = torch.empty_like(buffer)
        for r0 in range(0, batch, p.chunk):
            r1 = min(r0 + p.chunk, batch)
            block, _ = _logits_chunk(p, r0, r1, buffer)
            loss[r0:r1], stats[0, r0:r1], positive_grad = _sigmoid_chunk(p, r0, r1, block, scratch)
            if acc is not None:
                coef = torch.full((r1 - r0,), grad_row_coef, dtype=dtype, device=device)
                acc.add(r0, r1, block, coef, coef * positive_grad)
        return loss, stats, (acc.finish() if acc is not None else None)

    if mode == "pairwise":
        scratch = torch.empty_like(buffer)
        for r0 in range(0, batch, p.chunk):
            r1 = min(r0 + p.chunk, batch)
            block, invalid = _logits_chunk(p, r0, r1, buffer)
            loss[r0:r1], stats[0, r0:r1], stats[1, r0:r1], stats[2, r0:r1] = _pairwise_chunk(
                p, r0, r1, block, invalid, scratch)
            if acc is not None:
                coef = torch.full((r1 - r0,), grad_row_coef, dtype=dtype, device=device)
                acc.add(r0, r1, block, coef * stats[1, r0:r1], coef * stats[2, r0:r1])
        return loss, stats, (acc.finish() if acc is not None else None)

    column_copy = torch.empty(p.chunk, batch, dtype=dtype, device=device) if symmetric else None
    col_max = torch.full((batch,), float("-inf"), dtype=dtype, device=device)  # columns 0..B-1 (symmetric)
    col_sum = torch.zeros(batch, dtype=dtype, device=device)
    for r0 in range(0, batch, p.chunk):
        r1 = min(r0 + p.chunk, batch)
        block, _ = _logits_chunk(p, r0, r1, buffer)
        positive = _target_logits(block, p.target[r0:r1])
        if symmetric:
            _update_column_stats(column_copy[: r1 - r0].copy_(block[:, :batch]), col_max, col_sum)
        stats[0, r0:r1], stats[3, r0:r1], row_sum = _exp_in_place(block)
        stats[2, r0:r1] = positive
        loss[r0:r1] = (stats[0, r0:r1] - positive) + stats[3, r0:r1]
        if acc is not None:
            coef = torch.full((r1 - r0,), grad_row_coef, dtype=dtype, device=device)
            acc.add(r0, r1, block, coef / row_sum, coef)
    if symmetric:
        stats[1], stats[4] = finite_shift(col_max), col_sum.log()
        loss = (loss + ((stats[1] - stats[2]) + stats[4])) / 2  # stats[2] = s_ii (target = arange)
    grads = None
    if grad_row_coef is not None and symmetric:
        coef = torch.full((batch,), grad_row_coef, dtype=dtype, device=device)
        grads = _backward_pass(p, stats, coef, want_logq_grad, buffer, column_copy)
    elif acc is not None:
        grads = acc.finish()
    return loss, stats, grads


def _backward_pass(p: _Problem, stats: torch.Tensor, row_coef: torch.Tensor, want_logq_grad: bool,
                   buffer: torch.Tensor, scratch: Optional[torch.Tensor]) -> Grads:
    """Recompute logits chunk-wise and accumulate gradients for per-row upstream coefficients ``row_coef``."""
    acc = _GradAccumulator(p, want_logq_grad)
    if p.mode == "softmax":   # a_i P_ij = exp(s_ij - m_i) * row_factor_i, row_factor = a_i exp(-l_i)
        row_shift, row_factor = probability_factors(stats[0], stats[3], row_coef / 2 if p.symmetric else row_coef)
    if p.symmetric:
        column_shift, column_coef = probability_factors(stats[1], stats[4], row_coef / 2)
    for r0 in range(0, p.batch, p.chunk):
        r1 = min(r0 + p.chunk, p.batch)
        block, invalid = _logits_chunk(p, r0, r1, buffer)
        coef = row_coef[r0:r1]
        if p.mode == "pairwise":
            rows = torch.arange(r1 - r0, device=block.device)
            block[rows, p.target[r0:r1]] = float("-inf")
            block.sub_(stats[0, r0:r1, None]).sigmoid_()
            acc.add(r0, r1, block, coef * stats[1, r0:r1], coef * stats[2, r0:r1])
        elif p.mode == "sigmoid":
            rows = torch.arange(r1 - r0, device=block.device)
            block[rows, p.target[r0:r1]] = float("-inf")
            acc.add(r0, r1, block.sigmoid_(), coef, coef * torch.sigmoid(-stats[0, r0:r1]))
        elif p.symmetric:
            # G = c_i/2 P_ij + [j < B] c_j/2 Pc_ij - (c_i + c_i)/2 [i == j]: both directions in one block
            half = coef / 2
            column = scratch[: r1 - r0].copy_(block[:, :p.batch])
            column.sub_(column_shift[None, :]).exp_().mul_(column_coef[None, :])
            block.sub_(row_shift[r0:r1, None]).exp_().mul_(row_factor[r0:r1, None])
            block[:, :p.batch].add_(column)
            acc.add(r0, r1, block, None, half + half)
        else:
            block.sub_(row_shift[r0:r1, None]).exp_()
            acc.add(r0, r1, block, row_factor[r0:r1], coef)
    return acc.finish()


def contrastive_backward(row_coef, query, keys, target, temperature, key_ids, logq, mode, symmetric, stats,
                         want_logq_grad: bool = False, chunk_rows: Optional[int] = None) -> Grads:
    """Gradients of ``sum_i row_coef_i * loss_i`` given the forward's ``stats`` (recomputes the logits)."""
    p = _prepare(query, keys, target, temperature, key_ids, logq, mode, symmetric, chunk_rows)
    buffer = torch.empty(p.chunk, p.num_keys, dtype=p.query.dtype, device=p.query.device)
    scratch = torch.empty(p.chunk, p.batch, dtype=p.query.dtype, device=p.query.device) if symmetric else None
    return _backward_pass(p, stats.to(p.query.dtype), row_coef.to(p.query.dtype), want_logq_grad, buffer, scratch)
