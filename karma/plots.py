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
        steps = [h["step"] for h in result["history"]]
        action = _smooth([h.get("action", float("nan")) for h in result["history"]])
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


def metrics_table(results: List[dict], columns: List[str]) -> str:
    """A markdown table: one row per variant, one column per metric (mean ± std over seeds when several)."""
    header = "| variant | " + " | ".join(columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [header, rule]
    for result in results:
        cells = []
        for column in columns:
            value = result["metrics"].get(column, float("nan"))
            spread = result.get("metrics_std", {}).get(column, 0.0)
            multi = len(result.get("seeds", ())) > 1 and column != "train_s"
            cells.append(_format(value) + (f" ± {_format(spread)}" if multi and value == value else ""))
        rows.append(f"| {result['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _format(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


__all__ = ["plot_ablation", "metrics_table"]
