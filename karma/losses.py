"""The KARMA objectives, each switchable by its weight; every loss goes through ``karma_kernels``.

  action          contrastive_loss of h against the clicked item, with in-batch and hard (shown, not clicked)
                  negatives; false negatives (the same item again) masked by item id; softmax or pairwise mode
  generation      LM loss of the next item's text after the history (linear_cross_entropy through the LM head)
  reconstruction  the next item's text decoded from h alone via a one-token prefix (prefix_reconstruction_loss);
                  gradients reach h
  image           conditional flow matching from h to the next item's image feature
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from karma_kernels import contrastive_loss, linear_cross_entropy, prefix_reconstruction_loss
from karma_kernels.contrastive.distributed import distributed_contrastive_loss

from .data import ConfigError
from .model import Batch, KarmaModel, history_tensors

OBJECTIVES = ("action", "generation", "reconstruction", "image")
ACTION_MODES = ("softmax", "pairwise")
BACKENDS = ("auto", "triton", "torch", "reference")


@dataclass
class ObjectiveConfig:
    # Defaults are full KARMA; a weight of 0 switches an objective off.
    action: float = 1.0
    generation: float = 0.5
    reconstruction: float = 0.5
    image: float = 0.5
    action_mode: str = "softmax"
    temperature: float = 0.05
    backend: str = "auto"   # karma_kernels backend for every loss

    def __post_init__(self):
        for name in OBJECTIVES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"objectives.{name} must be a weight >= 0, got {value!r}")
        if not any(getattr(self, name) > 0 for name in OBJECTIVES):
            raise ConfigError(f"objectives: at least one of {', '.join(OBJECTIVES)} needs a weight > 0")
        if self.action_mode not in ACTION_MODES:
            raise ConfigError(f"objectives.action_mode must be one of {ACTION_MODES}, got {self.action_mode!r}")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ConfigError(f"objectives.temperature must be > 0, got {self.temperature!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"objectives.backend must be one of {BACKENDS}, got {self.backend!r}")

    def active(self):
        return [name for name in OBJECTIVES if getattr(self, name) > 0]


def action_loss(h: torch.Tensor, item_emb: torch.Tensor, batch: Batch, objectives: ObjectiveConfig) -> torch.Tensor:
    # Keys: the B clicked items (row i's positive is key i) then every row's hard negatives, shared by all rows.
    keys = item_emb[torch.cat([batch.target_index, batch.negative_index])]
    key_ids = torch.cat([batch.target_ids, batch.negative_ids])
    options = dict(temperature=objectives.temperature, key_ids=key_ids, mode=objectives.action_mode,
                   backend=objectives.backend)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        # Every rank's clicked items and hard negatives become negatives for every query.
        return distributed_contrastive_loss(h, keys, **options)
    return contrastive_loss(h, keys, **options)


def generation_loss(model: KarmaModel, states: torch.Tensor, prefix_len: int, text_ids: torch.Tensor,
                    backend: str) -> torch.Tensor:
    # The state at <interest> predicts w_1, the state at w_l predicts w_{l+1}.
    length = text_ids.shape[1]
    hidden = states[:, prefix_len - 1: prefix_len - 1 + length].reshape(-1, states.shape[-1])
    target = text_ids.masked_fill(text_ids == model.pad_id, -100).reshape(-1)
    # Under autocast the op casts hidden and weight to the autocast dtype itself (as F.linear would).
    return linear_cross_entropy(hidden, model.lm_head_weight.to(hidden.dtype), target, bias=_bias(model, hidden),
                                ignore_index=-100, backend=backend)


def decode_text_loss(model: KarmaModel, states: torch.Tensor, text_ids: torch.Tensor, backend: str) -> torch.Tensor:
    """LM loss of ``text_ids`` from states [B, 1 + L, D] of [one prefix token, text] (prefix_len = 1)."""
    return prefix_reconstruction_loss(states, model.lm_head_weight.to(states.dtype), text_ids, prefix_len=1,
                                      pad_id=model.pad_id, bias=_bias(model, states), backend=backend)


def reconstruction_loss(model: KarmaModel, h: torch.Tensor, text_ids: torch.Tensor, backend: str) -> torch.Tensor:
    return decode_text_loss(model, model.reconstruction_states(h, text_ids), text_ids, backend)


def language_model_loss(model: KarmaModel, text_ids: torch.Tensor, bos_id: int, backend: str) -> torch.Tensor:
    """Plain LM loss on catalog text ([<bos>, text]), for the optional pretraining phase."""
    return decode_text_loss(model, model.text_states(text_ids, bos_id), text_ids, backend)


def _bias(model: KarmaModel, like: torch.Tensor) -> Optional[torch.Tensor]:
    bias = model.lm_head_bias
    return None if bias is None else bias.to(like.dtype)


def karma_losses(model: KarmaModel, batch: Batch, objectives: ObjectiveConfig,
                 generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Each active objective's loss and their weighted sum under key ``"total"``."""
    item_emb = model.item_embeddings(batch.item_ids)
    history_emb, history_mask = history_tensors(item_emb, batch.history_index)
    text_ids = model.item_tokens[batch.target_ids]
    with_text = objectives.generation > 0
    h, states, prefix_len, _ = model.user_forward(history_emb, history_mask, text_ids if with_text else None)

    losses: Dict[str, torch.Tensor] = {}
    if objectives.action > 0:
        losses["action"] = action_loss(h, item_emb, batch, objectives)
    if objectives.generation > 0:
        losses["generation"] = generation_loss(model, states, prefix_len, text_ids, objectives.backend)
    if objectives.reconstruction > 0:
        losses["reconstruction"] = reconstruction_loss(model, h, text_ids, objectives.backend)
    if objectives.image > 0:
        if model.flow_head is None:
            raise ConfigError("objectives.image > 0 but the dataset has no image features")
        losses["image"] = model.flow_head.loss(h, model.item_images[batch.target_ids].to(h.dtype), generator)
    losses["total"] = sum(getattr(objectives, name) * loss for name, loss in losses.items())
    return losses
