"""Baselines beside every karma result, on the same split, examples, protocol and metrics: popularity, item-kNN,
a Markov chain (``counting``) and a SASRec-style ID model (``sasrec``)."""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

from .counting import ItemKNN, Markov, Popularity
from .sasrec import sasrec_config

BASELINES = ("popularity", "item-kNN", "Markov", "SASRec")
_COUNTING = {"popularity": Popularity, "item-kNN": ItemKNN, "Markov": Markov}


def counting_metrics(model, split, examples, ks: Sequence[int], protocol: str) -> Dict[str, object]:
    from ..evaluate import retrieval_metrics, seen_items, top_k_scores

    seen = seen_items(examples) if protocol == "masked" else None
    ids = top_k_scores(model.scores(examples), max(ks), seen)
    return retrieval_metrics(ids, examples.target, ks, split.train_counts)


def run_baselines(config, dataset, split=None, names: Optional[Sequence[str]] = None, protocol: str = "kept",
                  ks: Sequence[int] = (10, 50, 200), say=print, examples_name: str = "test") -> List[dict]:
    """Fit and score each baseline; returns one ``{"variant", "metrics"}`` dict per baseline (metrics include
    ``train_s`` and the warm / cold slices)."""
    from ..evaluate import evaluate
    from ..train import build_workspace, split_dataset, train

    names = list(names or BASELINES)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"baselines: unknown name(s) {unknown} (known: {', '.join(BASELINES)})")
    if split is None:
        split = split_dataset(config, dataset)
    examples = getattr(split, examples_name)
    results = []
    for name in names:
        started = time.perf_counter()
        if name in _COUNTING:
            metrics = counting_metrics(_COUNTING[name](split, dataset.num_items), split, examples, ks, protocol)
        else:
            workspace = build_workspace(sasrec_config(config), dataset)
            train(workspace)
            metrics = evaluate(workspace.model, getattr(workspace.split, examples_name), ks, probe_steps=0,
                               protocol=protocol, train_counts=workspace.split.train_counts,
                               backend=config.objectives.backend)
            metrics["epochs"] = workspace.log.get("epochs_trained")
        metrics["train_s"] = time.perf_counter() - started
        say(f"baseline {name}: HR@10 {metrics['HR@10']:.4f} NDCG@10 {metrics['NDCG@10']:.4f} "
            f"({metrics['train_s']:.1f} s)")
        results.append({"variant": f"baseline: {name}", "metrics": metrics, "seeds": [config.train.seed]})
    return results


__all__ = ["BASELINES", "run_baselines", "Popularity", "ItemKNN", "Markov", "sasrec_config"]
