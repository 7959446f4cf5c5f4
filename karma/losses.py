"""The KARMA objectives, each switchable by its weight; every loss goes through ``karma_kernels``.

  action          dense: h at every position of the user sequence against its next click; the candidates are the
                  batch's distinct targets plus its shown-not-clicked items (hard negatives), with the logQ
                  correction (each key's in-batch frequency) on by default; false negatives masked by item id;
                  softmax or pairwise mode
  generation      LM loss of the next item's text after the history (linear_cross_entropy through the LM head)
  reconstruction  the next item's text decoded from h alone via a one-token prefix (prefix_reconstruction_loss);
                  gradients reach h
  image           conditional flow matching from h to the next item's image feature
Generation, reconstruction and image use one sampled position per sequence, so their cost stays that of one
example per user however long the sequences are. With both LM objectives on, they share the tied LM head in one
fused call (``weighted_linear_cross_entropy``: each objective's mean kept by per-token weights; on the CPU path
one [V, D] weight gradient held from forward to backward instead of two); their entries in the losses dict are
then detached values for reporting, and "total" carries the gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from karma_kernels import contrastive_loss, linear_cross_entropy, prefix_reconstruction_loss
from karma_kernels.linear_ce.weighted import mean_objectives_on_one_head

from .data import ConfigError
from .model import Batch, KarmaModel, history_tensors, position_ids_from_mask

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
    logq: bool = True       # subtract log(in-batch frequency) from each candidate's logit (popularity correction)
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
        if not isinstance(self.logq, bool):
            raise ConfigError(f"objectives.logq must be true or false, got {self.logq!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"objectives.backend must be one of {BACKENDS}, got {self.backend!r}")

    def active(self):
        return [name for name in OBJECTIVES if getattr(self, name) > 0]


def action_loss(h_all: torch.Tensor, item_emb: torch.Tensor, batch: Batch, objectives: ObjectiveConfig
                ) -> torch.Tensor:
    """Mean over the batch's positions of the contrastive loss of h (``h_all`` [B, T, E]) against the next click.

    Under torchrun every rank embeds the keys of the whole (global) batch and sums its local positions' losses
    scaled by world_size / num_queries: with gradients averaged over ranks that is exactly the single-process
    gradient (no key gather needed, since every rank draws the same global batch)."""
    queries = h_all.reshape(-1, h_all.shape[-1])[batch.query_position]
    keys = item_emb[batch.key_index]
    world = torch.distributed.get_world_size() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 1
    loss = contrastive_loss(queries, keys, batch.query_key, temperature=objectives.temperature,
                            key_ids=batch.key_ids, logq=batch.key_logq if objectives.logq else None,
                            mode=objectives.action_mode, reduction="sum", backend=objectives.backend)
    return loss * (world / max(1, batch.num_queries))


def _generation_hidden(states: torch.Tensor, prefix_len: int, length: int) -> torch.Tensor:
    # The state at the last history position predicts w_1, the state at w_l predicts w_{l+1}.
    return states[:, prefix_len - 1: prefix_len - 1 + length].reshape(-1, states.shape[-1])


def generation_loss(model: KarmaModel, states: torch.Tensor, prefix_len: int, text_ids: torch.Tensor,
                    backend: str) -> torch.Tensor:
    hidden = _generation_hidden(states, prefix_len, text_ids.shape[1])
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


def shared_head_lm_losses(model: KarmaModel, hidden_sets, text_ids: torch.Tensor, weights, backend: str):
    """sum_k weights[k] * (mean LM loss of hidden_sets[k] [B * L, D] predicting text_ids [B, L]) in one fused
    call on the LM head, and each mean loss (detached). Pad tokens are ignored, as in ``generation_loss``."""
    target = text_ids.masked_fill(text_ids == model.pad_id, -100).reshape(-1)
    like = hidden_sets[0]
    return mean_objectives_on_one_head(hidden_sets, model.lm_head_weight.to(like.dtype), target, weights,
                                       bias=_bias(model, like), ignore_index=-100, backend=backend)


def language_model_loss(model: KarmaModel, text_ids: torch.Tensor, bos_id: int, backend: str) -> torch.Tensor:
    """Plain LM loss on catalog text ([<bos>, text]), for the optional pretraining phase.

    It goes through the Hugging Face integration (``karma_kernels.integrations.transformers``): the backbone's own
    forward with ``labels``, its loss computed by ``linear_cross_entropy`` without the [tokens, vocab] logits; the
    model layer is that integration's first user. Padding is ignored (label -100)."""
    from karma_kernels.integrations.transformers import patched

    ids = torch.cat([torch.full_like(text_ids[:, :1], bos_id), text_ids], dim=1)
    mask = ids != model.pad_id
    with patched(model.backbone, backend=backend) as backbone:
        output = backbone(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask),
                          labels=ids.masked_fill(~mask, -100), use_cache=False)
    return output.loss


def _bias(model: KarmaModel, like: torch.Tensor) -> Optional[torch.Tensor]:
    bias = model.lm_head_bias
    return None if bias is None else bias.to(like.dtype)


def karma_losses(model: KarmaModel, batch: Batch, objectives: ObjectiveConfig,
                 generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Each active objective's loss and their weighted sum under key ``"total"``."""
    item_emb = model.item_embeddings(batch.item_ids)
    losses: Dict[str, torch.Tensor] = {}
    h_sample = None
    needs_sample = objectives.reconstruction > 0 or objectives.image > 0
    if objectives.action > 0 or needs_sample:
        history_emb, history_mask = history_tensors(item_emb, batch.history_index)
        _, states, prefix_len, _ = model.user_forward(history_emb, history_mask)
        h_all = model.interest(states[:, :prefix_len])
        if objectives.action > 0:
            losses["action"] = action_loss(h_all, item_emb, batch, objectives)
        h_sample = h_all.reshape(-1, h_all.shape[-1])[batch.sample_position]
    text_ids = model.item_tokens[batch.sample_target_ids]
    weighted = []  # weighted losses already combined (the shared-head LM total)
    shared_lm = objectives.generation > 0 and objectives.reconstruction > 0
    if objectives.generation > 0:
        # the sampled prefix followed by the next item's text: one extra forward of one prefix per row
        history_emb, history_mask = history_tensors(item_emb, batch.sample_history_index)
        _, states, prefix_len, _ = model.user_forward(history_emb, history_mask, text_ids)
        if not shared_lm:
            losses["generation"] = generation_loss(model, states, prefix_len, text_ids, objectives.backend)
    if shared_lm:
        # both LM objectives on the tied head in one fused call (one weight gradient, not two)
        length = text_ids.shape[1]
        reconstruction_states = model.reconstruction_states(h_sample, text_ids)
        hidden_sets = (_generation_hidden(states, prefix_len, length),
                       _generation_hidden(reconstruction_states, 1, length))
        lm_total, (generation, reconstruction) = shared_head_lm_losses(
            model, hidden_sets, text_ids, (objectives.generation, objectives.reconstruction), objectives.backend)
        losses["generation"], losses["reconstruction"] = generation, reconstruction
        weighted.append(lm_total)
    elif objectives.reconstruction > 0:
        losses["reconstruction"] = reconstruction_loss(model, h_sample, text_ids, objectives.backend)
    if objectives.image > 0:
        if model.flow_head is None:
            raise ConfigError("objectives.image > 0 but the dataset has no image features")
        losses["image"] = model.flow_head.loss(h_sample, model.item_images[batch.sample_target_ids].to(h_sample.dtype),
                                               generator)
    reported_only = ("generation", "reconstruction") if shared_lm else ()  # already in lm_total
    weighted += [getattr(objectives, name) * loss for name, loss in losses.items() if name not in reported_only]
    losses["total"] = sum(weighted)
    return losses
