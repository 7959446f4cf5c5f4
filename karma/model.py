"""The KARMA model: an HF causal LM that reads a user's history as soft item tokens and emits the next-interest
embedding h, an item tower, and the heads the objectives need (reconstruction prefix projector, flow head).

Sequences (``B`` users, ``H`` = max_history, ``L`` = item text length incl. eos):
  user / generation   [h_1 .. h_H (soft item tokens, left-padded), <interest>, w_1 .. w_L]
                      h is read from the final state at <interest>; the states from <interest> on predict the
                      next item's text (history-conditioned generation). Causal attention means the text after
                      <interest> does not change h, so one forward serves both.
  reconstruction      [proj(h), w_1 .. w_L]: the text decoded from h alone (one-token prefix).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ConfigError

ITEM_ENCODERS = ("backbone", "bow")


@dataclass
class ModelConfig:
    backbone_path: Optional[str] = None   # a local HF model directory; None builds the tiny Llama-style config
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    embed_dim: int = 64                   # item / interest embedding size
    max_history: int = 10
    max_text_len: int = 8                 # item text tokens incl. eos
    # "bow": mean of the backbone's token embeddings + MLP (shares the embedding table the LM objectives train);
    # "backbone": mean-pooled final backbone states (4x slower on CPU; after LM pretraining its states are nearly
    # parallel for all items and the action loss stalls at chance in our runs, see README)
    item_encoder: str = "bow"
    use_image: bool = True                # add the image feature to the item embedding (when the data has one)
    flow_hidden: int = 128
    attn_implementation: str = "auto"     # "auto": flash_attention_2 on CUDA when installed, else "sdpa"

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "embed_dim", "max_history",
                     "max_text_len", "flow_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.max_text_len < 2:
            raise ConfigError(f"model.max_text_len must be >= 2 (one word and eos), got {self.max_text_len}")
        if self.backbone_path is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                              f"({self.num_heads})")
        if self.item_encoder not in ITEM_ENCODERS:
            raise ConfigError(f"model.item_encoder must be one of {ITEM_ENCODERS}, got {self.item_encoder!r}")
        if self.attn_implementation not in ("auto", "sdpa", "eager", "flash_attention_2"):
            raise ConfigError("model.attn_implementation must be one of auto, sdpa, eager, flash_attention_2, "
                              f"got {self.attn_implementation!r}")


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_backbone(config: ModelConfig, vocab_size: int, device: torch.device = torch.device("cpu")):
    """An HF causal LM: from a local directory, or the tiny Llama-style config trained from scratch."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    attn = resolve_attn_implementation(config.attn_implementation, device)
    if config.backbone_path is not None:
        # Our word tokenizer replaces the model's own: its embedding table is resized to our vocabulary.
        backbone = AutoModelForCausalLM.from_pretrained(config.backbone_path, local_files_only=True,
                                                        attn_implementation=attn)
        if backbone.get_input_embeddings().weight.shape[0] != vocab_size:
            backbone.resize_token_embeddings(vocab_size)
    else:
        hf_config = LlamaConfig(vocab_size=vocab_size, hidden_size=config.hidden_size,
                                intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                                num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
                                max_position_embeddings=config.max_history + 2 * config.max_text_len + 8,
                                tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        backbone = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn)
    return backbone


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift them."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class FlowMatchingHead(nn.Module):
    """Conditional flow matching: a velocity field v(x_t, t | h) carrying N(0, I) to the image feature."""

    def __init__(self, feature_dim: int, condition_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim + condition_dim + 16, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, feature_dim))
        self.register_buffer("frequencies", torch.exp(torch.linspace(0, math.log(1000.0), 8)), persistent=False)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.frequencies[None, :]
        return self.net(torch.cat([x_t, condition, angles.sin(), angles.cos()], dim=-1))

    def loss(self, condition: torch.Tensor, target: torch.Tensor, generator: Optional[torch.Generator] = None):
        noise = torch.randn(target.shape, generator=generator, device="cpu").to(target)
        t = torch.rand(target.shape[0], generator=generator, device="cpu").to(target)
        x_t = (1 - t[:, None]) * noise + t[:, None] * target
        return F.mse_loss(self.velocity(x_t, t, condition), target - noise)

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, feature_dim: int, steps: int = 8,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = torch.randn((condition.shape[0], feature_dim), generator=generator, device="cpu").to(condition)
        for i in range(steps):
            t = torch.full((condition.shape[0],), i / steps, device=condition.device, dtype=condition.dtype)
            x = x + self.velocity(x, t, condition) / steps
        return x


class KarmaModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, pad_id: int, item_tokens: torch.Tensor,
                 image_features: Optional[torch.Tensor] = None, device: torch.device = torch.device("cpu")):
        super().__init__()
        if item_tokens.dim() != 2 or item_tokens.shape[1] > config.max_text_len:
            raise ConfigError(f"item_tokens must be [num_items, <= model.max_text_len], got {tuple(item_tokens.shape)}")
        self.config = config
        self.pad_id = pad_id
        self.backbone = build_backbone(config, vocab_size, device)
        hidden = self.backbone.get_input_embeddings().weight.shape[1]
        self.hidden_size = hidden
        # The catalog lives with the model (not saved in checkpoints: it is rebuilt from the data config).
        self.register_buffer("item_tokens", item_tokens.long(), persistent=False)
        self.register_buffer("item_images", image_features.float() if image_features is not None else None,
                             persistent=False)
        self.uses_image = bool(config.use_image and image_features is not None)
        image_dim = image_features.shape[1] if image_features is not None else 0
        if config.item_encoder == "bow":
            self.text_to_item = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, config.embed_dim))
        else:
            self.text_to_item = nn.Linear(hidden, config.embed_dim)
        self.image_to_item = (nn.Sequential(nn.Linear(image_dim, hidden), nn.GELU(),
                                            nn.Linear(hidden, config.embed_dim)) if self.uses_image else None)
        self.item_to_token = nn.Linear(config.embed_dim, hidden)     # history item -> soft token
        self.interest_token = nn.Parameter(torch.randn(hidden) * 0.02)
        self.interest_head = nn.Linear(hidden, config.embed_dim)     # final <interest> state -> h
        self.prefix_projector = nn.Sequential(nn.Linear(config.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.flow_head = (FlowMatchingHead(image_dim, config.embed_dim, config.flow_hidden)
                          if image_features is not None else None)

    # -- pieces --------------------------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The backbone without its LM head: returns final (normed) hidden states, never vocabulary logits."""
        return getattr(self.backbone, self.backbone.base_model_prefix)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.backbone.get_output_embeddings().weight

    @property
    def lm_head_bias(self) -> Optional[torch.Tensor]:
        return getattr(self.backbone.get_output_embeddings(), "bias", None)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(ids)

    def run_decoder(self, inputs_embeds: torch.Tensor, mask: torch.Tensor, output_attentions: bool = False):
        return self.decoder(inputs_embeds=inputs_embeds, attention_mask=mask.long(),
                            position_ids=position_ids_from_mask(mask), output_attentions=output_attentions,
                            use_cache=False)

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings [U, E] of items ``item_ids`` [U] from their text (and image feature)."""
        tokens = self.item_tokens[item_ids]
        mask = tokens != self.pad_id
        if self.config.item_encoder == "backbone":
            states = self.run_decoder(self.embed_tokens(tokens), mask).last_hidden_state
        else:
            states = self.embed_tokens(tokens)
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        embedding = self.text_to_item(pooled)
        if self.uses_image:
            embedding = embedding + self.image_to_item(self.item_images[item_ids].to(embedding.dtype))
        return F.normalize(embedding.float(), dim=-1)

    @torch.no_grad()
    def all_item_embeddings(self, chunk: int = 1024) -> torch.Tensor:
        ids = torch.arange(self.item_tokens.shape[0], device=self.item_tokens.device)
        return torch.cat([self.item_embeddings(ids[i:i + chunk]) for i in range(0, len(ids), chunk)])

    def user_forward(self, history_emb: torch.Tensor, history_mask: torch.Tensor,
                     text_ids: Optional[torch.Tensor] = None, output_attentions: bool = False):
        """h [B, E] from history embeddings [B, H, E] (mask [B, H]); with ``text_ids`` [B, L] the text follows the
        interest token and the returned states [B, H + 1 + L, D] also serve history-conditioned generation.
        Returns (h, hidden_states, prefix_len, decoder_output)."""
        batch, history_len = history_mask.shape
        soft = self.item_to_token(history_emb.to(self.item_to_token.weight.dtype))
        soft = soft * history_mask.unsqueeze(-1).to(soft.dtype)
        interest = self.interest_token.to(soft.dtype).expand(batch, 1, -1)
        parts, masks = [soft, interest], [history_mask, torch.ones_like(history_mask[:, :1])]
        if text_ids is not None:
            parts.append(self.embed_tokens(text_ids).to(soft.dtype))
            masks.append(text_ids != self.pad_id)
        mask = torch.cat(masks, dim=1)
        output = self.run_decoder(torch.cat(parts, dim=1), mask, output_attentions=output_attentions)
        states = output.last_hidden_state
        prefix_len = history_len + 1
        h = F.normalize(self.interest_head(states[:, prefix_len - 1]).float(), dim=-1)
        return h, states, prefix_len, output

    def reconstruction_states(self, h: torch.Tensor, text_ids: torch.Tensor,
                              projector: Optional[nn.Module] = None) -> torch.Tensor:
        """States [B, 1 + L, D] of [projector(h), text]: the text decoded from h alone. ``projector`` replaces
        the model's own prefix projector (the decodability probe trains a fresh one)."""
        projector = self.prefix_projector if projector is None else projector
        prefix = projector(h.to(self.prefix_projector[0].weight.dtype)).unsqueeze(1)
        tokens = self.embed_tokens(text_ids).to(prefix.dtype)
        mask = torch.cat([torch.ones_like(text_ids[:, :1], dtype=torch.bool), text_ids != self.pad_id], dim=1)
        return self.run_decoder(torch.cat([prefix, tokens], dim=1), mask).last_hidden_state

    def text_states(self, text_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
        """States [B, 1 + L, D] of [<bos>, text] for plain language modelling of catalog text."""
        bos = torch.full_like(text_ids[:, :1], bos_id)
        ids = torch.cat([bos, text_ids], dim=1)
        return self.run_decoder(self.embed_tokens(ids), ids != self.pad_id).last_hidden_state

    def set_attn_implementation(self, name: str):
        self.backbone.set_attn_implementation(name)


def history_tensors(item_emb: torch.Tensor, history_index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather history embeddings [B, H, E] from ``item_emb`` [U, E] by ``history_index`` [B, H] (-1 = padding)."""
    mask = history_index >= 0
    gathered = item_emb[history_index.clamp_min(0)]
    return gathered * mask.unsqueeze(-1).to(gathered.dtype), mask


@dataclass
class Batch:
    """One training batch. Items are embedded once per batch: ``item_ids`` [U] are the distinct items, and every
    other field indexes into them. history_index [B, H] (-1 = padding); target_index / target_ids [B];
    negative_index / negative_ids / negative_rows [K]: the rows' shown-not-clicked items, flattened."""
    item_ids: torch.Tensor
    history_index: torch.Tensor
    target_index: torch.Tensor
    target_ids: torch.Tensor
    negative_index: torch.Tensor
    negative_ids: torch.Tensor
    negative_rows: torch.Tensor

    @property
    def size(self) -> int:
        return self.target_ids.shape[0]


def make_batch(examples, rows, device: torch.device = torch.device("cpu")) -> Batch:
    """Assemble ``examples`` (a ``karma.data.Examples``) rows ``rows`` into a :class:`Batch` (host-side, so the
    device never syncs for the unique/inverse bookkeeping)."""
    import numpy as np

    rows = np.asarray(rows)
    history = examples.history[rows]
    target = examples.target[rows]
    negatives = examples.negatives[rows]
    neg_rows, neg_cols = np.nonzero(negatives >= 0)
    negative_ids = negatives[neg_rows, neg_cols]
    present = np.concatenate([history[history >= 0], target, negative_ids])
    item_ids, inverse = np.unique(present, return_inverse=True)
    n_hist = int((history >= 0).sum())
    history_index = np.full(history.shape, -1, dtype=np.int64)
    history_index[history >= 0] = inverse[:n_hist]
    target_index = inverse[n_hist:n_hist + len(target)]
    negative_index = inverse[n_hist + len(target):]

    def tensor(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long).to(device, non_blocking=True)

    return Batch(tensor(item_ids), tensor(history_index), tensor(target_index), tensor(target),
                 tensor(negative_index), tensor(negative_ids), tensor(neg_rows))
