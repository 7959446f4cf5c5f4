"""The leave-one-out split without per-example copies.

Storage is linear in the number of clicks: every user's clicks live once in a flat array (:class:`ClickLog`), and
examples are indices into it. Training rows are *windows* of a user's training clicks (every position of a window
predicts the next click: dense supervision); evaluation rows are one (user, target position) each, whose history
is sliced from the log when a batch asks for it.

Per user with n >= 3 clicks: the last click is the test target, the second-to-last the validation target and the
first n - 2 clicks are the training sequence. Users with fewer than 3 clicks only train. Nothing from a target's
future reaches its history, and training never sees a validation or test target position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from .data import ConfigError, RecDataset


@dataclass
class ClickLog:
    """Users' clicks concatenated: user u's clicks are ``items[offsets[u]:offsets[u + 1]]`` in time order;
    ``negatives[c]`` the items shown but not clicked at click c (-1 padded, [C, K])."""
    items: np.ndarray
    offsets: np.ndarray
    negatives: np.ndarray

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]], impressions: Sequence[Sequence[Sequence[int]]],
                   max_negatives: int) -> "ClickLog":
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        items = np.fromiter((i for s in sequences for i in s), dtype=np.int64, count=int(offsets[-1]))
        negatives = np.full((len(items), max_negatives), -1, dtype=np.int64)
        if max_negatives:
            click = 0
            for user_shown in impressions:
                for shown in user_shown:
                    shown = shown[:max_negatives]
                    negatives[click, : len(shown)] = shown
                    click += 1
        return cls(items, offsets, negatives)

    def length(self, user) -> np.ndarray:
        return self.offsets[np.asarray(user) + 1] - self.offsets[np.asarray(user)]


def left_padded(log: ClickLog, starts: np.ndarray, ends: np.ndarray, width: Optional[int] = None) -> np.ndarray:
    """[N, width] rows ``log.items[starts[r]:ends[r]]``, right-aligned, -1 on the left; width defaults to the
    longest row (a batch is trimmed to its longest history)."""
    lengths = ends - starts
    width = int(lengths.max(initial=1)) if width is None else width
    column = np.arange(width)[None, :]
    first = width - lengths[:, None]
    index = starts[:, None] + column - first
    valid = column >= first
    return np.where(valid, log.items[np.where(valid, index, 0)], -1)


@dataclass
class Examples:
    """Evaluation rows: row r predicts click ``position[r]`` of ``user[r]`` from at most ``max_history`` clicks
    before it. ``history`` / ``target`` / ``negatives`` are built from the log on access."""
    log: ClickLog
    user: np.ndarray
    position: np.ndarray
    max_history: int

    def __len__(self) -> int:
        return len(self.user)

    def _flat(self, rows=None) -> np.ndarray:
        rows = slice(None) if rows is None else rows
        return self.log.offsets[self.user[rows]] + self.position[rows]

    def histories(self, rows=None, width: Optional[int] = None) -> np.ndarray:
        """[N, H] history item ids (most recent last, -1 padding), H = the longest history of these rows."""
        ends = self._flat(rows)
        starts = np.maximum(self.log.offsets[self.user[slice(None) if rows is None else rows]],
                            ends - self.max_history)
        return left_padded(self.log, starts, ends, width)

    @property
    def history(self) -> np.ndarray:
        return self.histories()

    @property
    def target(self) -> np.ndarray:
        return self.log.items[self._flat()]

    @property
    def negatives(self) -> np.ndarray:
        return self.log.negatives[self._flat()]

    def subset(self, rows) -> "Examples":
        return Examples(self.log, self.user[rows], self.position[rows], self.max_history)


@dataclass
class Windows:
    """Training rows: row r is the clicks ``log.items[start[r]:end[r]]`` (at most max_history + 1 of them); each
    click but the last predicts the next one. Windows tile each user's training sequence from its end, so every
    training target is predicted exactly once per epoch."""
    log: ClickLog
    start: np.ndarray
    end: np.ndarray
    user: np.ndarray
    max_history: int

    def __len__(self) -> int:
        return len(self.start)

    @property
    def num_targets(self) -> int:
        return int((self.end - self.start - 1).sum())

    def inputs_targets(self, rows) -> tuple:
        """inputs [B, T] and targets [B, T] (-1 padding, left), T = the longest window of these rows minus one;
        negatives [B, T, K] of each target."""
        rows = np.asarray(rows)
        starts, ends = self.start[rows], self.end[rows]
        inputs = left_padded(self.log, starts, ends - 1)
        targets = left_padded(self.log, starts + 1, ends, inputs.shape[1])
        width = inputs.shape[1]
        column = np.arange(width)[None, :]
        flat = (ends - width)[:, None] + column
        valid = targets >= 0
        negatives = np.where(valid[..., None], self.log.negatives[np.where(valid, flat, 0)], -1)
        return inputs, targets, negatives

    def as_examples(self) -> Examples:
        """One evaluation-style row per window: its last click from the clicks before it (the decodability probe
        trains on these)."""
        return Examples(self.log, self.user, self.end - 1 - self.log.offsets[self.user], self.max_history)


@dataclass
class Split:
    train: Windows
    valid: Examples
    test: Examples
    max_history: int
    max_negatives: int = 0
    train_counts: Optional[np.ndarray] = None   # [num_items] training clicks per item (cold-start slices)
    cold_items: Optional[np.ndarray] = None     # items held out of training by ``cold_item_fraction``
    notes: List[str] = field(default_factory=list)


def leave_one_out(dataset: RecDataset, max_history: int = 50, max_negatives: int = 9,
                  cold_item_fraction: float = 0.0, seed: int = 0) -> Split:
    """The leave-one-out split (see the module docstring). ``cold_item_fraction`` > 0 holds that fraction of the
    items out of training (their clicks are dropped from every training sequence, kept in evaluation histories
    and targets): a cold-start split on any dataset."""
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise ConfigError(f"model.max_history must be >= 1, got {max_history!r}")
    if max_negatives < 0:
        raise ConfigError(f"train.num_hard_negatives must be >= 0, got {max_negatives!r}")
    if not 0.0 <= cold_item_fraction < 1.0:
        raise ConfigError(f"data.cold_item_fraction must be in [0, 1), got {cold_item_fraction!r}")
    log = ClickLog.from_lists(dataset.sequences, dataset.impressions, max_negatives)
    lengths = log.length(np.arange(len(dataset.sequences)))
    evaluated = np.flatnonzero(lengths >= 3)
    train_len = np.where(lengths >= 3, lengths - 2, lengths)

    # the training log: each user's first train_len clicks, held-out items dropped (one linear pass)
    keep = np.arange(len(log.items)) - np.repeat(log.offsets[:-1], lengths) < np.repeat(train_len, lengths)
    cold = None
    if cold_item_fraction > 0:
        rng = np.random.default_rng(seed)
        cold = np.sort(rng.choice(dataset.num_items, int(round(cold_item_fraction * dataset.num_items)),
                                  replace=False))
        keep &= ~np.isin(log.items, cold)
    users_of_click = np.repeat(np.arange(len(lengths)), lengths)
    train_lengths = np.bincount(users_of_click[keep], minlength=len(lengths))
    train_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(train_lengths, out=train_offsets[1:])
    train_log = ClickLog(log.items[keep], train_offsets, log.negatives[keep])

    # windows of at most max_history + 1 clicks tiling each training sequence from its end
    starts, ends, users = [], [], []
    for u in np.flatnonzero(train_lengths >= 2):
        first, end = train_offsets[u], train_offsets[u + 1]
        while end - first >= 2:
            start = max(first, end - max_history - 1)
            starts.append(start)
            ends.append(end)
            users.append(u)
            end = start + 1
    if not starts or not len(evaluated):
        raise ValueError(f"leave_one_out: dataset {dataset.name!r} has too few clicks per user "
                         "(need users with at least 3 clicks)")
    train = Windows(train_log, np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64),
                    np.array(users, dtype=np.int64), max_history)
    valid = Examples(log, evaluated, lengths[evaluated] - 2, max_history)
    test = Examples(log, evaluated, lengths[evaluated] - 1, max_history)
    counts = np.bincount(train_log.items, minlength=dataset.num_items)
    return Split(train, valid, test, max_history, max_negatives, counts, cold)
