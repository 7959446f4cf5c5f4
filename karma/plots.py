"""Matplotlib figures of an ablation, saved to PNG (the Agg backend: no screen needed)."""
from __future__ import annotations

from typing import List


def plot_ablation(results: List[dict], path: str, title: str = "KARMA ablation"):
    """Left: retrieval metrics per variant (grouped bars); right: the action loss during alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_names = [m for m in ("HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@50", "NDCG@200", "AUC",
                                "decodability", "probe_decodability") if any(m in r["metrics"] for r in results)]
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / max(1, len(results))
    for i, result in enumerate(results):
        values = [result["metrics"].get(m, float("nan")) for m in metric_names]
        spread = [result.get("metrics_std", {}).get(m, 0.0) for m in metric_names]
        bars.bar([x + i * width for x in range(len(metric_names))], values, width, yerr=spread, capsize=2,
                 label=result["variant"])
        steps = [h["step"] for h in result.get("history", [])]
        action = _smooth([h.get("action", float("nan")) for h in result.get("history", [])])
        curves.plot(steps, action, label=result["variant"])
    bars.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(metric_names))])
    bars.set_xticklabels(metric_names, rotation=30)
    bars.set_ylabel("test metric")
    bars.set_title("test metrics by variant (error bars: std over seeds)" if any(len(r.get("seeds", ())) > 1
                                                                             for r in results) else
                   "test metrics by variant")
    bars.legend(fontsize=8)
    curves.set_xlabel("alignment step")
    curves.set_ylabel("action loss (moving average)")
    seeds = results[0].get("seeds") if results else None
    curves.set_title(f"action loss (seed {seeds[0]})" if seeds else "action loss")
    curves.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _smooth(values: List[float], window: int = 20) -> List[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


__all__ = ["plot_ablation"]
