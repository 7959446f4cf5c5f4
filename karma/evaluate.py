"""Evaluation: retrieval of the next item through sharded indexes, ranking-stage AUC, and the two semantic probes
(decodability of the item text from h; attention-sink ratio, the paper's collapse symptom).

Protocols (``protocol=``): "kept" ranks every item, the user's already clicked items included (RecBole's default
for sequential models, and the one to use when users re-click); "masked" removes every item of the user's
history before ranking. Slices: "warm" / "cold" split the examples by their target's number of training clicks
(cold: at most ``cold_max_clicks``), so the effect of item text on items the ID cannot describe is visible.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .model import KarmaModel, history_tensors

DEFAULT_KS = (10, 50, 200)
PROTOCOLS = ("kept", "masked")
COLD_MAX_CLICKS = 2
NAN_REASONS = {
    "AUC": "the data has no impressions (shown-but-not-clicked items)",
    "image_cos": "the data has no image features",
}


@torch.no_grad()
def interest_embeddings(model: KarmaModel, item_emb: torch.Tensor, history: np.ndarray,
                        batch_size: int = 256) -> torch.Tensor:
    """h [N, E] for history rows [N, H] (item ids, -1 = padding), using precomputed item embeddings."""
    device = item_emb.device
    out = []
    for start in range(0, len(history), batch_size):
        rows = history[start:start + batch_size]
        columns = (rows >= 0).any(0)
        width = rows.shape[1] - int(columns.argmax()) if columns.any() else 1
        index = torch.as_tensor(rows[:, rows.shape[1] - width:], device=device)   # trimmed to its longest history
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


def target_ranks(ids: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of each target in retrieved ``ids`` [Q, k]; int64 max where it was not retrieved."""
    hits = ids == target[:, None]
    return np.where(hits.any(1), hits.argmax(1), np.iinfo(np.int64).max)


def metrics_from_ranks(rank: np.ndarray, ks: Sequence[int]) -> Dict[str, float]:
    metrics = {}
    for k in ks:
        found = rank < k
        metrics[f"HR@{k}"] = float(found.mean()) if len(rank) else float("nan")
        metrics[f"NDCG@{k}"] = float(np.where(found, 1.0 / np.log2(np.minimum(rank, k) + 2.0), 0.0).mean()) \
            if len(rank) else float("nan")
    return metrics


def seen_items(examples) -> list:
    """Every item a row's user clicked before its target (the whole history, not only the last max_history)."""
    log = examples.log
    starts = log.offsets[examples.user]
    ends = starts + examples.position
    return [log.items[a:b] for a, b in zip(starts, ends)]


def drop_seen(ids: np.ndarray, seen: list, k: int) -> np.ndarray:
    """[Q, k] ``ids`` rows without the items of ``seen[q]`` (order kept; -1 fills rows that run out)."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for row, (found, drop) in enumerate(zip(ids, seen)):
        kept = found[~np.isin(found, drop)][:k]
        out[row, : len(kept)] = kept
    return out


def top_k_scores(scores: torch.Tensor, k: int, seen: Optional[list] = None) -> np.ndarray:
    """Top-k item ids [Q, k] of dense ``scores`` [Q, num_items], the ``seen`` items of each row excluded."""
    if seen is not None:
        scores = scores.clone()
        rows = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
        scores[torch.as_tensor(rows), torch.as_tensor(np.concatenate(seen + [np.empty(0, np.int64)]))] = -np.inf
    return scores.topk(min(k, scores.shape[1]), dim=1).indices.cpu().numpy()


def slice_masks(target: np.ndarray, train_counts: Optional[np.ndarray], cold_max_clicks: int = COLD_MAX_CLICKS
                ) -> Dict[str, np.ndarray]:
    if train_counts is None:
        return {}
    cold = train_counts[target] <= cold_max_clicks
    return {"warm": ~cold, "cold": cold}


def ranking_metrics(ids: np.ndarray, target: np.ndarray, ks: Sequence[int]) -> Dict[str, float]:
    """HR@K and NDCG@K (one relevant item per query) from retrieved ``ids`` [Q, k]."""
    rank = target_ranks(ids, target)
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
    full_mask = mask
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
    generator = torch.Generator(device=h.device).manual_seed(seed)
    sample = model.flow_head.sample(h.to(truth.dtype), truth.shape[1], generator=generator)
    return float(torch.nn.functional.cosine_similarity(sample, truth, dim=-1).mean())


@torch.no_grad()
def validation_score(model: KarmaModel, examples, max_examples: int = 2000, ks: Sequence[int] = (10, 50)
                     ) -> Dict[str, float]:
    """HR@k and NDCG@k on (at most ``max_examples`` of) ``examples`` by exact dense scoring: the early-stopping
    signal, cheap enough to run every few epochs."""
    was_training = model.training
    model.eval()
    try:
        rows = np.arange(min(max_examples, len(examples)))
        item_emb = model.all_item_embeddings()
        h = interest_embeddings(model, item_emb, examples.histories(rows))
        ids = top_k_scores(h @ item_emb.T, max(ks))
        return metrics_from_ranks(target_ranks(ids, examples.target[rows]), ks)
    finally:
        model.train(was_training)


def retrieval_metrics(ids: np.ndarray, target: np.ndarray, ks: Sequence[int], train_counts=None,
                      cold_max_clicks: int = COLD_MAX_CLICKS) -> Dict[str, object]:
    """Ranking metrics of retrieved ``ids`` over all rows, per slice (warm / cold) and the per-row ranks (for
    paired comparisons)."""
    rank = target_ranks(ids, target)
    metrics: Dict[str, object] = metrics_from_ranks(rank, ks)
    slices = {}
    for name, mask in slice_masks(target, train_counts, cold_max_clicks).items():
        slices[name] = {**metrics_from_ranks(rank[mask], ks), "examples": int(mask.sum())}
    metrics["slices"] = slices
    metrics["ranks"] = np.minimum(rank, 10 ** 9).tolist()
    return metrics


@torch.no_grad()
def evaluate(model: KarmaModel, examples, ks: Sequence[int] = DEFAULT_KS, num_shards: int = 4,
             batch_size: int = 256, max_examples: Optional[int] = None, probe_examples=None,
             probe_steps: int = 150, backend: str = "auto", protocol: str = "kept", train_counts=None,
             cold_max_clicks: int = COLD_MAX_CLICKS) -> Dict[str, object]:
    """Every metric on ``examples`` (a ``karma.split.Examples``, e.g. the test split). With ``probe_examples``
    (e.g. the training windows' examples) the decodability probe trains on them and adds ``probe_decodability``.
    With ``train_counts`` (items' training clicks) the ranking metrics are also reported per slice under
    ``"slices"``; ``"ranks"`` holds each example's target rank."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluate: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    was_training = model.training
    model.eval()
    try:
        n = len(examples) if max_examples is None else min(max_examples, len(examples))
        examples = examples.subset(np.arange(n))
        history, target, negatives = examples.history, examples.target, examples.negatives
        item_emb = model.all_item_embeddings()
        h = interest_embeddings(model, item_emb, history, batch_size)
        seen = seen_items(examples) if protocol == "masked" else None
        depth = max(ks) + (max((len(s) for s in seen), default=0) if seen is not None else 0)
        _, ids = retrieve(item_emb.cpu().numpy(), h.cpu().numpy(), depth, num_shards)
        if seen is not None:
            ids = drop_seen(ids, seen, max(ks))
        metrics = retrieval_metrics(ids, target, ks, train_counts, cold_max_clicks)
        metrics["AUC"] = impression_auc(h.cpu(), item_emb.cpu(), target, negatives)
        metrics["decodability"] = decodability(model, h, target, batch_size)
        if probe_examples is not None and probe_steps > 0:
            if hasattr(probe_examples, "as_examples"):     # training windows: one row per window
                probe_examples = probe_examples.as_examples()
            rows = np.random.default_rng(0).permutation(len(probe_examples))[:4096]
            h_train = interest_embeddings(model, item_emb, probe_examples.histories(rows), batch_size)
            metrics["probe_decodability"] = decodability_probe(
                model, h_train, probe_examples.target[rows], h, target, steps=probe_steps, backend=backend)
        metrics["sink_ratio"] = attention_sink_ratio(model, item_emb, history)
        metrics["image_cos"] = image_reconstruction_cosine(model, h, target)
        metrics["item_cosine"] = mean_pairwise_cosine(item_emb)
        metrics["coverage@10"] = int(len(np.unique(ids[:, :10][ids[:, :10] >= 0])))
        metrics["examples"] = n
        return metrics
    finally:
        model.train(was_training)


def mean_pairwise_cosine(item_emb: torch.Tensor, sample: int = 2000) -> float:
    """Mean cosine between distinct item embeddings (collapse shows as values near 1)."""
    emb = item_emb[:sample].float()
    n = emb.shape[0]
    if n < 2:
        return float("nan")
    gram = emb @ emb.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))
