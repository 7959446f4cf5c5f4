"""The KARMA model: an HF causal LM that reads a user's history as soft item tokens and emits a next-interest
embedding h at every position, an item tower, and the heads the objectives need (reconstruction prefix projector,
flow head).

Sequences (``B`` users, ``T`` history positions, ``L`` = item text length incl. eos):
  user                [x_1 .. x_T (soft item tokens, left-padded)]: the state at x_t gives h_t, the interest after
                      the first t clicks (causal attention: h_t never sees x_{t+1}...), so one forward trains every
                      position of a sequence (dense supervision) and evaluation reads h at the last position.
  generation          [x_1 .. x_t, w_1 .. w_L]: the state at x_t (the one h_t is read from) and the text states
                      predict the next item's text (history-conditioned generation).
  reconstruction      [proj(h), w_1 .. w_L]: the text decoded from h alone (one-token prefix).

Item tower (``item_encoder``): "bow" (mean of the backbone's token embeddings of the item text + MLP), "backbone"
(mean-pooled backbone states), "id" (an ID embedding table, no text: the SASRec baseline) or "bow+id" (text plus
an ID embedding initialised at zero, so items whose texts collide stay distinguishable once they have clicks).
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

ITEM_ENCODERS = ("bow", "backbone", "id", "bow+id")
MAX_TEXT_LEN_CAP = 32


@dataclass
class ModelConfig:
    backbone_path: Optional[str] = None   # a local HF model directory; None builds the tiny Llama-style config
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    embed_dim: int = 64                   # item / interest embedding size
    max_history: int = 50                 # clicks a user sequence keeps (batches are trimmed to their longest)
    # item text tokens incl. eos; None: the data's 95th percentile, capped at MAX_TEXT_LEN_CAP (a warning counts
    # the items cut)
    max_text_len: Optional[int] = None
    # "bow": mean of the backbone's token embeddings + MLP (shares the embedding table the LM objectives train);
    # "backbone": mean-pooled final backbone states (4x slower on CPU; after LM pretraining its states are nearly
    # parallel for all items and the action loss stalls at chance in our runs, see README); "id": ID embeddings
    # only; "bow+id" (default): both (see the module docstring). On real MovieLens-100k "bow+id" raised test HR@10
    # 0.108 -> 0.126 over "bow" (README); items without clicks keep a zero ID part, so cold items rank by text.
    item_encoder: str = "bow+id"
    use_image: bool = True                # add the image feature to the item embedding (when the data has one)
    flow_hidden: int = 128
    dropout: float = 0.0                  # on the history's soft tokens and in attention (the SASRec baseline: 0.3)
    attn_implementation: str = "auto"     # "auto": flash_attention_2 on CUDA when installed, else "sdpa"

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "embed_dim", "max_history",
                     "max_text_len", "flow_hidden"):
            value = getattr(self, name)
            if name == "max_text_len" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.max_text_len is not None and self.max_text_len < 2:
            raise ConfigError(f"model.max_text_len must be >= 2 (one word and eos), got {self.max_text_len}")
        if self.backbone_path is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                              f"({self.num_heads})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
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
                                max_position_embeddings=config.max_history + 2 * (config.max_text_len or
                                                                                  MAX_TEXT_LEN_CAP) + 8,
                                tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                attention_dropout=config.dropout)
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
        """Noise and times are drawn where ``generator`` lives (default: on ``target``'s device), so no draw
        crosses devices; pass a generator on the model's device (``karma.train.step_generator`` makes one)."""
        device = generator.device if generator is not None else target.device
        noise = torch.randn(target.shape, generator=generator, device=device).to(target)
        t = torch.rand(target.shape[0], generator=generator, device=device).to(target)
        x_t = (1 - t[:, None]) * noise + t[:, None] * target
        return F.mse_loss(self.velocity(x_t, t, condition), target - noise)

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, feature_dim: int, steps: int = 8,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        device = generator.device if generator is not None else condition.device
        x = torch.randn((condition.shape[0], feature_dim), generator=generator, device=device).to(condition)
        for i in range(steps):
            t = torch.full((condition.shape[0],), i / steps, device=condition.device, dtype=condition.dtype)
            x = x + self.velocity(x, t, condition) / steps
        return x


class KarmaModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, pad_id: int, item_tokens: torch.Tensor,
                 image_features: Optional[torch.Tensor] = None, device: torch.device = torch.device("cpu")):
        super().__init__()
        if config.max_text_len is None:
            raise ConfigError("KarmaModel: model.max_text_len must be resolved (karma.workspace.build_workspace "
                              "sets it from the data)")
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
        self.uses_text = config.item_encoder != "id"
        if config.item_encoder in ("bow", "bow+id"):
            # LayerNorm first: the LM's token embeddings start tiny (std 0.02), so without it the MLP's biases
            # dominate, every item maps to nearly the same vector and the text tower collapses (cosine ~1)
            self.text_to_item = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(),
                                              nn.Linear(hidden, config.embed_dim))
        elif config.item_encoder == "backbone":
            self.text_to_item = nn.Linear(hidden, config.embed_dim)
        else:
            self.text_to_item = None
        self.item_id_embedding = None
        if config.item_encoder in ("id", "bow+id"):
            self.item_id_embedding = nn.Embedding(item_tokens.shape[0], config.embed_dim)
            if config.item_encoder == "bow+id":   # text decides until clicks teach the ID part
                nn.init.zeros_(self.item_id_embedding.weight)
            else:
                nn.init.normal_(self.item_id_embedding.weight, std=0.1)
        self.image_to_item = (nn.Sequential(nn.Linear(image_dim, hidden), nn.GELU(),
                                            nn.Linear(hidden, config.embed_dim)) if self.uses_image else None)
        self.item_to_token = nn.Linear(config.embed_dim, hidden)     # history item -> soft token
        self.interest_head = nn.Linear(hidden, config.embed_dim)     # state at a history position -> h
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
        embedding = None
        if self.uses_text:
            tokens = self.item_tokens[item_ids]
            mask = tokens != self.pad_id
            weights = mask / mask.sum(1, keepdim=True).clamp_min(1)  # a mean over the real (non-pad) tokens
            if self.config.item_encoder == "backbone":
                states = self.run_decoder(self.embed_tokens(tokens), mask).last_hidden_state
                pooled = (states * weights.unsqueeze(-1).to(states.dtype)).sum(1)
            else:  # one weighted bag per item: the [items, L, D] token rows are never gathered
                table = self.backbone.get_input_embeddings().weight
                pooled = F.embedding_bag(tokens, table, mode="sum", per_sample_weights=weights.to(table.dtype))
            embedding = self.text_to_item(pooled)
        if self.item_id_embedding is not None:
            ids = self.item_id_embedding(item_ids)
            embedding = ids if embedding is None else embedding + ids.to(embedding.dtype)
        if self.uses_image:
            embedding = embedding + self.image_to_item(self.item_images[item_ids].to(embedding.dtype))
        return F.normalize(embedding.float(), dim=-1)

    @torch.no_grad()
    def all_item_embeddings(self, chunk: int = 1024) -> torch.Tensor:
        ids = torch.arange(self.item_tokens.shape[0], device=self.item_tokens.device)
        return torch.cat([self.item_embeddings(ids[i:i + chunk]) for i in range(0, len(ids), chunk)])

    def user_forward(self, history_emb: torch.Tensor, history_mask: torch.Tensor,
                     text_ids: Optional[torch.Tensor] = None, output_attentions: bool = False):
        """h [B, E] at the last history position from history embeddings [B, H, E] (mask [B, H], left padding);
        with ``text_ids`` [B, L] the text follows the history and the returned states [B, H + L, D] also serve
        history-conditioned generation. Returns (h, hidden_states, prefix_len, decoder_output); h at every
        position is ``interest(hidden_states[:, :prefix_len])``."""
        history_len = history_mask.shape[1]
        soft = self.item_to_token(history_emb.to(self.item_to_token.weight.dtype))
        soft = F.dropout(soft, self.config.dropout, self.training) * history_mask.unsqueeze(-1).to(soft.dtype)
        parts, masks = [soft], [history_mask]
        if text_ids is not None:
            parts.append(self.embed_tokens(text_ids).to(soft.dtype))
            masks.append(text_ids != self.pad_id)
        mask = torch.cat(masks, dim=1)
        output = self.run_decoder(torch.cat(parts, dim=1), mask, output_attentions=output_attentions)
        states = output.last_hidden_state
        h = self.interest(states[:, history_len - 1])
        return h, states, history_len, output

    def interest(self, states: torch.Tensor) -> torch.Tensor:
        """L2-normalised interest embeddings from backbone states at history positions ([..., D] -> [..., E])."""
        return F.normalize(self.interest_head(states).float(), dim=-1)

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
    """One training batch of windows (``karma.split.Windows``) with dense supervision. Items are embedded once per
    batch: ``item_ids`` [U] are the distinct items, and the ``*_index`` fields index into them.

    history_index [B, T]: the window's inputs (-1 = padding, left); every valid position predicts a target.
    query_position [Q]: flat index (row * T + column) of each position with a target; query_key [Q]: its target's
    key. Keys (the action loss's candidates): the distinct targets of the whole batch plus its shown-not-clicked
    items, ``key_index`` / ``key_ids`` [M], with ``key_logq`` [M] the log of each key's in-batch frequency (the
    logQ correction). ``num_queries`` counts the whole batch's queries (all ranks), the loss's normaliser.
    Generation / reconstruction / image use one sampled position per row: ``sample_position`` [B] (flat, like
    query_position), ``sample_history_index`` [B, S] the history up to it, right-aligned, ``sample_target_ids`` [B].
    """
    item_ids: torch.Tensor
    history_index: torch.Tensor
    query_position: torch.Tensor
    query_key: torch.Tensor
    key_index: torch.Tensor
    key_ids: torch.Tensor
    key_logq: torch.Tensor
    num_queries: int
    sample_position: torch.Tensor
    sample_history_index: torch.Tensor
    sample_target_ids: torch.Tensor

    @property
    def size(self) -> int:
        return self.history_index.shape[0]


def make_batch(windows, rows, device: torch.device = torch.device("cpu"), rng=None, local=None) -> Batch:
    """Assemble training windows ``rows`` (a ``karma.split.Windows``) into a :class:`Batch` (host-side, so the
    device never syncs for the unique/inverse bookkeeping). ``rng`` (numpy) draws each row's sampled position;
    ``local`` (a slice of ``rows``) is this process's part when several share the batch: the keys come from all
    of ``rows``, the queries from the local part only."""
    import numpy as np

    rng = np.random.default_rng(0) if rng is None else rng
    rows = np.asarray(rows)
    inputs, targets, negatives = windows.inputs_targets(rows)
    valid = targets >= 0
    # one sampled position per row, drawn for the whole batch so every process draws the same
    counts = valid.sum(1)
    pick = (rng.random(len(rows)) * counts).astype(np.int64)
    sample_column = inputs.shape[1] - counts + pick       # valid positions are right-aligned
    keys = np.unique(np.concatenate([targets[valid], negatives[negatives >= 0]]))
    frequency = np.bincount(np.searchsorted(keys, targets[valid]), minlength=len(keys)) + \
        np.bincount(np.searchsorted(keys, negatives[negatives >= 0]), minlength=len(keys))
    num_queries = int(valid.sum())

    local = slice(None) if local is None else local
    inputs, targets, valid, sample_column = inputs[local], targets[local], valid[local], sample_column[local]
    batch, width = inputs.shape
    sample_targets = targets[np.arange(batch), sample_column]
    column = np.arange(width)[None, :]
    shift = width - 1 - sample_column[:, None]               # right-align the prefix ending at the sample
    source = column - shift
    sample_history = np.where(source >= 0, inputs[np.arange(batch)[:, None], np.maximum(source, 0)], -1)
    sample_history = sample_history[:, width - max(1, int((sample_history >= 0).sum(1).max(initial=1))):]

    item_ids = np.unique(np.concatenate([inputs[inputs >= 0], keys]))
    history_index = np.where(inputs >= 0, np.searchsorted(item_ids, np.maximum(inputs, 0)), -1)
    sample_history_index = np.where(sample_history >= 0, np.searchsorted(item_ids, np.maximum(sample_history, 0)),
                                    -1)
    row, col = np.nonzero(valid)

    def tensor(a, dtype=torch.long):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype).to(device, non_blocking=True)

    return Batch(item_ids=tensor(item_ids), history_index=tensor(history_index),
                 query_position=tensor(row * width + col), query_key=tensor(np.searchsorted(keys, targets[row, col])),
                 key_index=tensor(np.searchsorted(item_ids, keys)), key_ids=tensor(keys),
                 key_logq=tensor(np.log(frequency / frequency.sum()), torch.float32), num_queries=num_queries,
                 sample_position=tensor(np.arange(batch) * width + sample_column),
                 sample_history_index=tensor(sample_history_index), sample_target_ids=tensor(sample_targets))
