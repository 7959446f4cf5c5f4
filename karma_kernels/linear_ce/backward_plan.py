"""Where the one-pass backward keeps its fp32 accumulators: the plan of its launches over the vocabulary.

Pure Python (no torch, no triton): ``plan_backward`` returns the steps the launcher (``triton_impl.backward``)
walks, and the peak bytes of the gradient-sized buffers by allocation count.

Layouts (``BackwardPlan.layout``):

``"in_place"`` (default for fp16/bf16 weights): both fp32 accumulators live in memory the backward returns
    anyway. dHidden's columns [0, split) (split <= D / 2, whole D blocks) sum in the dHidden output itself (a
    2-byte row holds D / 2 fp32 values); the rest of its sums and one fp32 band live in the last ``t`` rows of
    the dWeight output (``torch.empty``; two 2-byte rows hold one fp32 row): T = [dHidden columns [split, D):
    H (D - split) / (D / 2) rows, i.e. H rows at split = D / 2][one fp32 band: 2 R rows], 16-byte aligned.
    Stage 1: dHidden + dWeight over the rows [0, V - t), band by band, each band's fp32 sums in T, cast into its
             rows before the next band.
    Stage 2: dHidden only over T's own rows: dHidden is complete; the launcher casts it into the dHidden output
             (columns [0, split) within their own rows, staged through the band's free rows) and T is free.
    Stage 3: dWeight only over T, in shrinking bands: with unwritten rows [a, b), a band of
             x = min(R, (b - a) // 3) rows (whole tiles while x >= one tile) at [b - x, b) keeps its fp32 sums in
             [a, a + 2x); b -= x; the last <= TAIL_ROWS rows take a separate fp32 scratch of that size.
    Extra work: the logits of T's rows are computed once more (stage 2 + stage 3 against one pass): + F t / V
    (plus stage 3's partial tiles; ``masked_rows``); t = H + 2 R at split = D / 2 (2 H + 2 R without a split).
    When t > V (a large batch against a small vocabulary), T is only the band (t = 2 R) and dHidden
    keeps its own fp32 accumulator; so it is without dHidden (need_hidden=False). No extra work then: T's rows
    take stage 1's kernel (dHidden + dWeight) in the shrinking bands.
``"bands"``: fp32 bands of R rows in a separate buffer, and a separate fp32 dHidden accumulator. Taken when even
    one band does not fit twice (2 R > V), with ``vocab_order=True`` (bands scatter their rows over the
    gradient, so no row range stays unwritten), and without dWeight (one step, nothing to hide in).
``"full"``: one fp32 [V, D] buffer addressed by class id: the gradient itself for fp32 weights; for fp16/bf16
    (cast at the end) with ``accum_dtype="fp32"``, or when one band covers the vocabulary (<= BAND_BYTES).

The deterministic variant has a plan of its own (``plan_deterministic``): its two kernels share no work, so its
fp32 sums take the dWeight output's unwritten rows at no extra work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

ALIGN_BYTES = 16        # every fp32 view inside the gradient starts 16-byte aligned (vectorized / async access)
FP32_BYTES = 4
# stage 3 shrinks its bands down to this many unwritten rows, which take the separate fp32 scratch (147 KB at
# D = 2304): a few more tiny launches at the end instead of a one-tile (1.2 MB) scratch
TAIL_ROWS = 16


@dataclass(frozen=True)
class Step:
    """One launch of the one-pass kernel over the vocabulary rows [v_start, v_start + v_count)."""

    stage: int                  # 1: dHidden + dWeight, 2: dHidden only, 3: dWeight only
    v_start: int
    v_count: int
    scratch_row: Optional[int]  # the band's fp32 sums live in gradient rows [scratch_row, + 2 v_count);
    #                             None: in the separate buffer (or the full buffer, or no dWeight at this step)

    @property
    def need_hidden(self) -> bool:
        return self.stage in (1, 2)

    @property
    def need_weight(self) -> bool:
        return self.stage in (1, 3)


@dataclass(frozen=True)
class BackwardPlan:
    layout: str                     # "in_place", "bands" or "full" (see the module docstring)
    steps: Tuple[Step, ...]
    hidden_acc_row: Optional[int]   # dHidden fp32 sums of columns [hidden_split, D) (H x (D - split), flat) from
    #                                 gradient row ``hidden_acc_row`` on; None: dHidden has its own fp32 buffer
    hidden_split: int               # columns [0, split) of dHidden: fp32 sums in the dHidden output's own memory
    spare_row: Optional[int]        # gradient rows [spare_row, + spare_rows) are free after stage 2 (the band's)
    spare_rows: int
    separate_rows: int              # rows of the separate fp32 dWeight buffer (0: none)
    reserved_rows: int              # t: the gradient rows that hold fp32 sums in stages 1-2 (0 unless in place)
    recomputed_rows: int            # vocabulary rows whose logits are computed twice (extra work F * this / V)
    masked_rows: int                # rows of partial tiles (computed, masked) beyond one pass's over V
    peak_bytes: int                 # gradient outputs + fp32 buffers outside them, at once, by allocation count


def _aligned_row_step(dim: int, elem_bytes: int) -> int:
    """Rows whose multiples start ALIGN_BYTES-aligned (given an aligned gradient)."""
    row_bytes = dim * elem_bytes
    return ALIGN_BYTES // math.gcd(row_bytes, ALIGN_BYTES)


def plan_backward(vocab: int, hidden_rows: int, dim: int, band: int, tile: int, *, elem_bytes: int,
                  need_hidden: bool, need_weight: bool, full_buffer: bool = False,
                  scattered: bool = False, hidden_split: int = 0) -> BackwardPlan:
    """The backward's steps. ``vocab`` x ``dim`` weight of ``elem_bytes`` (2: fp16/bf16, 4: fp32); ``hidden_rows``
    rows of dHidden (hidden's dtype = weight's); ``band``: rows of one fp32 band (``triton_configs.band_rows``);
    ``tile``: the kernel's vocabulary tile (BLOCK_V); ``full_buffer``: ``accum_dtype="fp32"``; ``scattered``:
    ``vocab_order=True`` (bands write scattered rows); ``hidden_split``: the first columns of dHidden whose fp32
    sums may live in the dHidden output itself (<= D / 2: an fp16/bf16 row holds D / 2 fp32 values)."""
    if (min(vocab, band, tile) < 1 or min(dim, hidden_rows, hidden_split) < 0 or elem_bytes not in (2, 4)
            or hidden_split * FP32_BYTES > dim * elem_bytes):
        raise ValueError(f"plan_backward: bad sizes vocab={vocab} hidden_rows={hidden_rows} dim={dim} band={band} "
                         f"tile={tile} elem_bytes={elem_bytes} hidden_split={hidden_split}")
    weight_out = vocab * dim * elem_bytes if need_weight else 0
    hidden_out = hidden_rows * dim * elem_bytes if need_hidden else 0
    hidden_acc = hidden_rows * dim * FP32_BYTES if need_hidden and elem_bytes != FP32_BYTES else 0
    if not need_weight:
        return BackwardPlan("bands", (Step(1, 0, vocab, None),), None, 0, None, 0, 0, 0, 0, 0, hidden_out + hidden_acc)
    if elem_bytes == FP32_BYTES or full_buffer or band >= vocab:
        full = vocab * dim * FP32_BYTES
        peak = full + hidden_acc + hidden_out + (weight_out if elem_bytes != FP32_BYTES else 0)
        return BackwardPlan("full", (Step(1, 0, vocab, None),), None, 0, None, 0, 0, 0, 0, 0, peak)
    ratio = FP32_BYTES // elem_bytes                      # gradient rows per fp32 row
    align = _aligned_row_step(dim, elem_bytes)
    acc_bytes = hidden_rows * (dim - hidden_split) * FP32_BYTES if hidden_acc else 0
    acc_rows = -(-acc_bytes // max(dim * elem_bytes * align, 1)) * align
    start = (vocab - acc_rows - ratio * band) // align * align
    if start < 0 and acc_rows:                            # no room for dHidden: keep only the band in place
        acc_bytes, acc_rows, start = 0, 0, (vocab - ratio * band) // align * align
    if scattered or start < 0:
        bands = tuple(Step(1, v0, min(band, vocab - v0), None) for v0 in range(0, vocab, band))
        return BackwardPlan("bands", bands, None, 0, None, 0, band, 0, 0, _masked_rows(bands, vocab, tile),
                            weight_out + band * dim * FP32_BYTES + hidden_acc + hidden_out)
    steps = [Step(1, v0, min(band, start - v0), start + acc_rows) for v0 in range(0, start, band)]
    if acc_bytes:
        steps.append(Step(2, start, vocab - start, None))
    last = 3 if acc_bytes else 1                          # T's own rows: dWeight only once dHidden is complete
    tail = _shrinking_bands(steps, last, start, vocab, band, tile, ratio)   # T: unwritten after stage 2
    peak = weight_out + hidden_out + tail * dim * FP32_BYTES + (0 if acc_bytes else hidden_acc)
    return BackwardPlan("in_place", tuple(steps), start if acc_bytes else None, hidden_split if acc_bytes else 0,
                        start + acc_rows, ratio * band, tail, vocab - start, vocab - start if acc_bytes else 0,
                        _masked_rows(steps, vocab, tile), peak)


def _shrinking_bands(steps: list, stage: int, low: int, high: int, band: int, tile: int, ratio: int) -> int:
    """Appends the dWeight steps over the unwritten rows [low, high): a band of x = min(band, (high - low) //
    (ratio + 1)) rows (whole tiles while x >= one tile) at [high - x, high) keeps its fp32 sums in [low, low +
    ratio x); high -= x; the last <= TAIL_ROWS rows take a separate fp32 scratch. Returns those rows."""
    while high - low > TAIL_ROWS:
        rows = min(band, (high - low) // (ratio + 1))
        if rows >= tile:
            rows = rows // tile * tile                    # whole tiles while the band is at least one
        if rows == 0:
            break
        steps.append(Step(stage, high - rows, rows, low))
        high -= rows
    if high > low:
        steps.append(Step(stage, low, high - low, None))
    return high - low


def plan_deterministic(vocab: int, hidden_rows: int, dim: int, band: int, tile: int, *, elem_bytes: int,
                       need_hidden: bool, need_weight: bool, full_buffer: bool = False) -> BackwardPlan:
    """The deterministic backward (a token-parallel dHidden kernel, then a vocabulary-parallel dWeight kernel; no
    atomics, no work shared between them): for fp16/bf16 weights, every fp32 sum lives in the dWeight output's
    unwritten rows. dHidden's kernel runs first (step of stage 2 over the whole vocabulary) with its fp32 sums in
    the gradient's first rows (all unwritten then; its own fp32 buffer if they do not fit), which are cast into the
    dHidden output; then dWeight in shrinking bands over [0, V) (stage 3 steps, ``_shrinking_bands``). Peak: the two
    gradients + the tail's scratch. fp32 weights, ``full_buffer`` (``accum_dtype="fp32"``), no dWeight, or a
    band as large as the vocabulary: the gradient-sized fp32 buffers of before (layout "full")."""
    if min(vocab, band, tile) < 1 or min(dim, hidden_rows) < 0 or elem_bytes not in (2, 4):
        raise ValueError(f"plan_deterministic: bad sizes vocab={vocab} hidden_rows={hidden_rows} dim={dim} "
                         f"band={band} tile={tile} elem_bytes={elem_bytes}")
    weight_out = vocab * dim * elem_bytes if need_weight else 0
    hidden_out = hidden_rows * dim * elem_bytes if need_hidden else 0
    hidden_acc = hidden_rows * dim * FP32_BYTES if need_hidden and elem_bytes != FP32_BYTES else 0
    ratio = FP32_BYTES // elem_bytes
    whole = ((Step(2, 0, vocab, None),) if need_hidden else ()) + (Step(3, 0, vocab, None),)
    if not need_weight or elem_bytes == FP32_BYTES or full_buffer or ratio * band >= vocab:
        full = vocab * dim * FP32_BYTES if need_weight else 0
        peak = full + hidden_acc + hidden_out + (weight_out if elem_bytes != FP32_BYTES else 0)
        return BackwardPlan("full", whole, None, 0, None, 0, 0, 0, 0, 0, peak)
    acc_rows = -(-hidden_acc // max(dim * elem_bytes, 1))  # from row 0: aligned with the gradient
    in_place = need_hidden and acc_rows <= vocab
    steps = [whole[0]] if need_hidden else []
    tail = _shrinking_bands(steps, 3, 0, vocab, band, tile, ratio)
    peak = weight_out + hidden_out + tail * dim * FP32_BYTES + (0 if in_place else hidden_acc)
    return BackwardPlan("in_place", tuple(steps), 0 if in_place else None, 0, None, 0, tail, 0, 0,
                        _masked_rows(steps[1 if need_hidden else 0:], vocab, tile), peak)


def _masked_rows(steps, vocab: int, tile: int) -> int:
    """Masked rows of the steps' partial tiles beyond those of one pass over the vocabulary."""
    return sum(-(-s.v_count // tile) * tile - s.v_count for s in steps) - (-(-vocab // tile) * tile - vocab)


def fp32_view_offset(row: int, dim: int, elem_bytes: int) -> int:
    """Element offset (in the gradient's flat storage) of the fp32 view that starts at gradient row ``row``;
    raises when it would not be ALIGN_BYTES-aligned."""
    offset = row * dim
    if (offset * elem_bytes) % ALIGN_BYTES:
        raise ValueError(f"linear_cross_entropy backward: fp32 view at row {row} (dim {dim}) is not "
                         f"{ALIGN_BYTES}-byte aligned")
    return offset
