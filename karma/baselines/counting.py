"""Counting baselines fitted on the training sequences of a split: popularity, item-kNN and a Markov chain.

Each is a ``fit(split, num_items)`` returning an object whose ``scores(examples)`` gives dense scores
[len(examples), num_items] (higher = ranked first); ``karma.baselines.run_baselines`` ranks and scores them on the
same examples, protocol and metrics as karma.
"""
from __future__ import annotations

import numpy as np
import torch


def _training_sequences(split):
    log = split.train.log
    return log.items, log.offsets


class Popularity:
    """Every user gets the items ranked by their number of training clicks."""
    name = "popularity"

    def __init__(self, split, num_items: int):
        items, _ = _training_sequences(split)
        self.counts = torch.as_tensor(np.bincount(items, minlength=num_items), dtype=torch.float32)

    def scores(self, examples) -> torch.Tensor:
        return self.counts.expand(len(examples), -1)


class ItemKNN:
    """Item-item cosine similarity of the training users' click sets; a user's score for item j is the sum of j's
    similarities to the user's last ``last`` clicks (dense [I, I]: meant for catalogs up to ~20k items)."""
    name = "item-kNN"

    def __init__(self, split, num_items: int, last: int = 10):
        items, offsets = _training_sequences(split)
        users = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        clicked = torch.zeros(len(offsets) - 1, num_items)
        clicked[torch.as_tensor(users), torch.as_tensor(items)] = 1.0
        co = clicked.T @ clicked
        norm = co.diagonal().clamp_min(1.0).sqrt()
        self.similarity = co / norm[:, None] / norm[None, :]
        self.similarity.fill_diagonal_(0.0)
        self.popularity = clicked.sum(0) / max(1.0, float(clicked.sum()))
        self.last = last

    def scores(self, examples) -> torch.Tensor:
        history = torch.as_tensor(examples.histories(width=self.last)[:, -self.last:])
        weights = (history >= 0).float()
        scores = (self.similarity[history.clamp_min(0)] * weights[..., None]).sum(1)
        return scores + 1e-6 * self.popularity   # ties (users with unseen items only) fall back to popularity


class Markov:
    """First-order transitions between consecutive training clicks, row-normalised; the last three clicks vote
    with weights 1, 1/2, 1/4, and popularity breaks ties."""
    name = "Markov"

    def __init__(self, split, num_items: int):
        items, offsets = _training_sequences(split)
        user_of_click = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        same_user = user_of_click[:-1] == user_of_click[1:]
        source, dest = items[:-1][same_user], items[1:][same_user]
        transitions = torch.zeros(num_items, num_items)
        transitions.index_put_((torch.as_tensor(source), torch.as_tensor(dest)), torch.ones(len(source)),
                               accumulate=True)
        self.transitions = transitions / transitions.sum(1, keepdim=True).clamp_min(1.0)
        counts = torch.as_tensor(np.bincount(items, minlength=num_items), dtype=torch.float32)
        self.popularity = counts / counts.sum().clamp_min(1.0)

    def scores(self, examples) -> torch.Tensor:
        history = torch.as_tensor(examples.histories(width=3)[:, -3:])
        weights = (history >= 0).float() * torch.tensor([0.25, 0.5, 1.0])
        return (self.transitions[history.clamp_min(0)] * weights[..., None]).sum(1) + 1e-3 * self.popularity
