"""A SASRec-style baseline: the same causal backbone, dense in-batch loss, split, budget and early stopping as
karma, but items are ID embeddings only (no text, no image, no LM objectives, no LM pretraining) and dropout 0.3 on the
history tokens and attention, as SASRec uses (without it the ID table memorises the training clicks). Where karma
beats it, the item text (and the KARMA objectives) pay; where it wins, the ID signal dominates."""
from __future__ import annotations


def sasrec_config(config):
    """``config`` (a karma ExperimentConfig) turned into the SASRec baseline's."""
    return config.replace(model={"item_encoder": "id", "use_image": False, "dropout": 0.3},
                          objectives={"action": 1.0, "generation": 0.0, "reconstruction": 0.0, "image": 0.0},
                          train={"pretrain_steps": 0})
