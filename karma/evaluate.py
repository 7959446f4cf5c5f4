"""Evaluation: retrieval of the next item through sharded indexes, ranking-stage AUC, and the two semantic probes
(decodability of the item text from h; attention-sink ratio, the paper's collapse symptom)."""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .model import KarmaModel, history_tensors

DEFAULT_KS = (10, 50, 200)


@torch.no_grad()
def interest_embeddings(model: KarmaModel, item_emb: torch.Tensor, history: np.ndarray,
                        batch_size: int = 256) -> torch.Tensor:
    """h [N, E] for history rows [N, H] (item ids, -1 = padding), using precomputed item embeddings."""
    device = item_emb.device
    out = []
    for start in range(0, len(history), batch_size):
        index = torch.as_tensor(history[start:start + batch_size], device=device)
        history_emb, mask = history_tensors(item_emb, index)
        h, _, _, _ = model.user_forward(history_emb, mask)
        out.append(h.float())
    return torch.cat(out)


def retrieve(item_emb: np.ndarray, queries: np.ndarray, k: int, num_shards: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k items by inner product, searched over ``num_shards`` exact faiss shards merged with topk_merge."""
    from .retrieval import ShardedIndex

    num_shards = max(1, min(num_shards, len(item_emb)))
    index = ShardedIndex.build(np.ascontiguousarray(item_emb, dtype=np.float32), num_shards, metric="ip")
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(item_emb)))


def ranking_metrics(ids: np.ndarray, target: np.ndarray, ks: Sequence[int]) -> Dict[str, float]:
    """HR@K and NDCG@K (one relevant item per query) from retrieved ``ids`` [Q, k]."""
    hits = ids == target[:, None]
    rank = np.where(hits.any(1), hits.argmax(1), np.iinfo(np.int64).max)
    metrics = {}
    for k in ks:
        found = rank < k
        metrics[f"HR@{k}"] = float(found.mean())
        metrics[f"NDCG@{k}"] = float(np.where(found, 1.0 / np.log2(np.minimum(rank, k) + 2.0), 0.0).mean())
    return metrics


def impression_auc(h: torch.Tensor, item_emb: torch.Tensor, target: np.ndarray, negatives: np.ndarray) -> float:
    """Mean over impressions of P(score(clicked) > score(shown, not clicked)), ties counting half. NaN when the
    data has no impressions."""
    valid = negatives >= 0
    rows = valid.any(1)
    if not rows.any():
        return float("nan")
    h, target, negatives, valid = h[rows], target[rows], negatives[rows], valid[rows]
    positive = (h * item_emb[torch.as_tensor(target)]).sum(-1, keepdim=True)
    negative = torch.einsum("be,bne->bn", h, item_emb[torch.as_tensor(np.where(valid, negatives, 0))])
    valid_t = torch.as_tensor(valid)
    wins = ((positive > negative).double() + 0.5 * (positive == negative).double()) * valid_t
    return float((wins.sum(1) / valid_t.sum(1)).mean())


@torch.no_grad()
def decodability(model: KarmaModel, h: torch.Tensor, target: np.ndarray, batch_size: int = 256,
                 projector: Optional[torch.nn.Module] = None) -> float:
    """Token accuracy (teacher forced) of reconstructing the target item's text from h alone through the
    reconstruction prefix: does the interest embedding still carry the item's semantics?"""
    weight = model.lm_head_weight
    bias = model.lm_head_bias
    correct = total = 0
    for start in range(0, len(h), batch_size):
        text = model.item_tokens[torch.as_tensor(target[start:start + batch_size], device=h.device)]
        states = model.reconstruction_states(h[start:start + batch_size], text, projector)[:, : text.shape[1]]
        logits = states.float() @ weight.float().T
        if bias is not None:
            logits = logits + bias.float()
        real = text != model.pad_id
        correct += int(((logits.argmax(-1) == text) & real).sum())
        total += int(real.sum())
    return correct / max(total, 1)


def decodability_probe(model: KarmaModel, h_train: torch.Tensor, target_train: np.ndarray, h_test: torch.Tensor,
                       target_test: np.ndarray, steps: int = 150, batch_size: int = 64, lr: float = 3e-3,
                       seed: int = 0, backend: str = "auto") -> float:
    """Decodability measured with a fresh prefix projector trained for ``steps`` on frozen training h (the model
    itself frozen), then scored on test h. Unlike :func:`decodability` it does not depend on whether the model
    trained its own projector, so every variant of an ablation is measured the same way."""
    from .losses import decode_text_loss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = copy.deepcopy(model.prefix_projector)
        for module in probe.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    h_train = h_train.detach()
    try:
        with torch.enable_grad():
            for _ in range(steps):
                rows = rng.integers(0, len(h_train), min(batch_size, len(h_train)))
                text = model.item_tokens[torch.as_tensor(target_train[rows], device=h_train.device)]
                states = model.reconstruction_states(h_train[torch.as_tensor(rows, device=h_train.device)], text,
                                                     probe)
                loss = decode_text_loss(model, states, text, backend)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for param in frozen:
            param.requires_grad_(True)
    return decodability(model, h_test, target_test, projector=probe)


@torch.no_grad()
def attention_sink_ratio(model: KarmaModel, item_emb: torch.Tensor, history: np.ndarray,
                         max_examples: int = 128) -> float:
    """Attention mass on the first real position of the user sequence, averaged over layers, heads, queries
    (after the first) and examples. Uses eager attention for the probe (sdpa/flash do not return weights)."""
    history = history[:max_examples]
    index = torch.as_tensor(history, device=item_emb.device)
    history_emb, mask = history_tensors(item_emb, index)
    previous = model.backbone.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        _, _, _, output = model.user_forward(history_emb, mask, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)       # + the interest token
    first = full_mask.float().argmax(1)                                       # first real position per row
    positions = torch.arange(full_mask.shape[1], device=mask.device)
    queries = full_mask & (positions[None, :] > first[:, None])               # real queries after the first
    ratios = []
    for attention in output.attentions:                                       # [B, heads, T, T]
        to_first = attention.float().gather(3, first.view(-1, 1, 1, 1).expand(-1, attention.shape[1],
                                                                                 attention.shape[2], 1)).squeeze(3)
        per_row = (to_first.mean(1) * queries).sum(1) / queries.sum(1).clamp_min(1)
        ratios.append(per_row[queries.any(1)])
    return float(torch.stack(ratios).mean())


@torch.no_grad()
def image_reconstruction_cosine(model: KarmaModel, h: torch.Tensor, target: np.ndarray, seed: int = 0) -> float:
    """Cosine between the image feature sampled from h by the flow head (8 Euler steps) and the true one."""
    if model.flow_head is None or model.item_images is None:
        return float("nan")
    truth = model.item_images[torch.as_tensor(target, device=h.device)].float()
    generator = torch.Generator().manual_seed(seed)
    sample = model.flow_head.sample(h.to(truth.dtype), truth.shape[1], generator=generator)
    return float(torch.nn.functional.cosine_similarity(sample, truth, dim=-1).mean())


@torch.no_grad()
def evaluate(model: KarmaModel, examples, ks: Sequence[int] = DEFAULT_KS, num_shards: int = 4,
             batch_size: int = 256, max_examples: Optional[int] = None, probe_examples=None,
             probe_steps: int = 150, backend: str = "auto") -> Dict[str, float]:
    """Every metric on ``examples`` (a ``karma.data.Examples``, e.g. the test split). With ``probe_examples``
    (e.g. the training split) the decodability probe trains on them and adds ``probe_decodability``."""
    was_training = model.training
    model.eval()
    try:
        n = len(examples) if max_examples is None else min(max_examples, len(examples))
        history, target, negatives = examples.history[:n], examples.target[:n], examples.negatives[:n]
        item_emb = model.all_item_embeddings()
        h = interest_embeddings(model, item_emb, history, batch_size)
        _, ids = retrieve(item_emb.cpu().numpy(), h.cpu().numpy(), max(ks), num_shards)
        metrics = ranking_metrics(ids, target, ks)
        metrics["AUC"] = impression_auc(h.cpu(), item_emb.cpu(), target, negatives)
        metrics["decodability"] = decodability(model, h, target, batch_size)
        if probe_examples is not None and probe_steps > 0:
            rows = np.random.default_rng(0).permutation(len(probe_examples))[:4096]
            h_train = interest_embeddings(model, item_emb, probe_examples.history[rows], batch_size)
            metrics["probe_decodability"] = decodability_probe(
                model, h_train, probe_examples.target[rows], h, target, steps=probe_steps, backend=backend)
        metrics["sink_ratio"] = attention_sink_ratio(model, item_emb, history)
        metrics["image_cos"] = image_reconstruction_cosine(model, h, target)
        metrics["examples"] = n
        return metrics
    finally:
        model.train(was_training)
