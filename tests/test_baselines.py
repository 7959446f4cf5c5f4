"""karma.baselines: each counting baseline against a loop over a hand-made log; the SASRec baseline is the ID-only
model with the same loss."""
import numpy as np
import pytest

from karma.baselines import ItemKNN, Markov, Popularity, sasrec_config
from karma.data import RecDataset
from karma.split import leave_one_out

SEQUENCES = [[0, 1, 2, 3, 4], [1, 2, 4, 0, 3], [2, 3, 1, 4, 2, 0], [4, 0, 1, 2, 3]]


@pytest.fixture(scope="module")
def split():
    dataset = RecDataset("toy", [f"item {i}" for i in range(6)], SEQUENCES,
                         [[()] * len(s) for s in SEQUENCES])
    return leave_one_out(dataset, max_history=3, max_negatives=0)


def training(split):
    return [s[:-2] for s in SEQUENCES]


def test_popularity(split):
    counts = np.bincount([i for s in training(split) for i in s], minlength=6)
    scores = Popularity(split, 6).scores(split.test)
    assert scores.shape == (4, 6) and (scores.numpy() == counts).all()


def test_item_knn_against_a_loop(split):
    sets = [set(s) for s in training(split)]
    knn = ItemKNN(split, 6, last=2)
    scores = knn.scores(split.test).numpy()
    for row, user in enumerate(split.test.user):
        history = SEQUENCES[user][: split.test.position[row]][-2:]
        for item in range(6):
            expected = 0.0
            for h in history:
                if h != item:
                    both = sum(h in s and item in s for s in sets)
                    norm = np.sqrt(max(1, sum(h in s for s in sets)) * max(1, sum(item in s for s in sets)))
                    expected += both / norm
            assert scores[row, item] == pytest.approx(expected, abs=1e-5)


def test_markov_against_a_loop(split):
    counts = np.zeros((6, 6))
    for s in training(split):
        for a, b in zip(s, s[1:]):
            counts[a, b] += 1
    transitions = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    markov = Markov(split, 6)
    scores = markov.scores(split.test).numpy()
    for row, user in enumerate(split.test.user):
        history = SEQUENCES[user][: split.test.position[row]][-3:]
        expected = sum(w * transitions[h] for w, h in zip([0.25, 0.5, 1.0][-len(history):], history))
        np.testing.assert_allclose(scores[row] - 1e-3 * markov.popularity.numpy(), expected, atol=1e-6)
    clicks = [i for s in training(split) for i in s]
    np.testing.assert_allclose(markov.popularity.numpy(), np.bincount(clicks, minlength=6) / len(clicks), rtol=1e-6)


def test_sasrec_is_the_id_only_model():
    pytest.importorskip("transformers")
    from karma.train import ExperimentConfig

    config = sasrec_config(ExperimentConfig.tiny())
    assert config.model.item_encoder == "id" and config.objectives.active() == ["action"]
    assert config.model.dropout == 0.3 and not config.model.use_image
    assert config.train.pretrain_steps == 0
