"""``karma ablate``: the KARMA variants (cumulative: each adds one objective to the previous one) trained from the
same data, seed, pretrained backbone and budget, evaluated on test overall and per slice (warm / cold items),
compared with action-only paired by test user and seed, and printed beside the baselines."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
from typing import List, Optional

import numpy as np

from .data import ConfigError

VARIANTS = {
    "action-only": ("action",),
    "+generation": ("action", "generation"),
    "+reconstruction": ("action", "generation", "reconstruction"),
    "full KARMA (+image)": ("action", "generation", "reconstruction", "image"),
}
TABLE_COLUMNS = ["HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@50", "NDCG@200", "AUC", "decodability",
                 "probe_decodability", "sink_ratio", "image_cos", "item_cosine", "coverage@10", "epochs", "train_s"]
SLICE_COLUMNS = ["HR@10", "NDCG@10", "HR@200"]
SHORT_COLUMNS = ["HR@10", "HR@50", "HR@200", "NDCG@10", "epochs", "train_s"]   # karma beside the baselines
SLICES = ("all", "warm", "cold")


def scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def summarise(variant: str, runs: List[dict]) -> dict:
    """One variant over seeds: mean metrics (and per slice), their standard deviation, the first seed's loss
    history."""
    names = scalar_metrics(runs[0]["metrics"]).keys()
    values = {name: np.array([run["metrics"].get(name, np.nan) for run in runs], dtype=np.float64) for name in names}
    slices = {}
    for slice_name, first in runs[0]["metrics"].get("slices", {}).items():
        slices[slice_name] = {name: float(np.mean([run["metrics"]["slices"][slice_name][name] for run in runs]))
                              for name in first}
    return {"variant": variant, "objectives": runs[0].get("objectives"), "seeds": [run["seed"] for run in runs],
            "metrics": {**{name: float(v.mean()) for name, v in values.items()}, "slices": slices},
            "metrics_std": {name: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for name, v in values.items()},
            "history": runs[0].get("history", []), "runs": runs}


def slice_ranks(run: dict, slice_name: str, masks: dict) -> np.ndarray:
    ranks = np.asarray(run["metrics"]["ranks"])
    return ranks if slice_name == "all" else ranks[masks[slice_name]]


def paired_deltas(runs: dict, reference: str, masks: dict, k: int = 10) -> dict:
    """HR@k of each variant minus the reference's, per slice: paired by test user and seed (same users, same
    seeds). The estimate is the mean over users of the per-user difference averaged over seeds; the 95% interval
    is normal over users (test-sample noise); ``per_seed`` lists each seed's difference (training noise)."""
    out = {}
    for variant, variant_runs in runs.items():
        if variant == reference:
            continue
        out[variant] = {}
        for slice_name in SLICES:
            if slice_name != "all" and slice_name not in masks:
                continue
            diffs = [(slice_ranks(a, slice_name, masks) < k).astype(float) -
                     (slice_ranks(b, slice_name, masks) < k).astype(float)
                     for a, b in zip(variant_runs, runs[reference])]
            per_user = np.mean(diffs, axis=0)
            n = len(per_user)
            half = 1.96 * per_user.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
            mean = float(per_user.mean()) if n else float("nan")
            out[variant][slice_name] = {"delta": mean, "ci": [mean - half, mean + half], "users": n,
                                        "per_seed": [float(d.mean()) if n else float("nan") for d in diffs]}
    return out


def _format(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def metrics_table(results: List[dict], columns: List[str]) -> str:
    """Markdown: one row per variant / baseline, one column per metric (mean ± std over seeds when several)."""
    rows = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for result in results:
        cells = []
        for column in columns:
            value = result["metrics"].get(column, float("nan"))
            spread = result.get("metrics_std", {}).get(column, 0.0)
            multi = len(result.get("seeds", ())) > 1 and column not in ("train_s", "epochs")
            cells.append(_format(value) + (f" ± {_format(spread)}" if multi and value == value else ""))
        rows.append(f"| {result['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def slice_counts(masks: dict, num_examples: int) -> dict:
    return {"all": num_examples, **{k: int(v.sum()) for k, v in masks.items()}}


def slice_table(results: List[dict], counts: dict) -> str:
    header = ["variant"] + [f"{m} {s}" for s in SLICES for m in SLICE_COLUMNS]
    rows = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for result in results:
        cells = []
        for slice_name in SLICES:
            slices = result["metrics"].get("slices", {})
            source = result["metrics"] if slice_name == "all" else slices.get(slice_name, {})
            cells += [_format(source.get(m, float("nan"))) for m in SLICE_COLUMNS]
        rows.append(f"| {result['variant']} | " + " | ".join(cells) + " |")
    rows.append("\nexamples per slice: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(rows)


def delta_table(deltas: dict, reference: str, k: int = 10) -> str:
    rows = [f"| vs {reference}: ΔHR@{k} | " + " | ".join(SLICES) + " |", "|---|" + "---:|" * len(SLICES)]
    for variant, per_slice in deltas.items():
        cells = []
        for slice_name in SLICES:
            d = per_slice.get(slice_name)
            cells.append("n/a" if d is None else
                         f"{d['delta']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] (seeds: "
                         + ", ".join(f"{x:+.3f}" for x in d["per_seed"]) + ")")
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_ablation(config, out: str, variants: Optional[List[str]] = None, say=print, num_seeds: int = 1,
                 baselines: Optional[List[str]] = None, protocol: str = "kept") -> List[dict]:
    """Train every variant from the same seed, data, pretrained backbone and budget; evaluate on test, overall
    and per slice; write ablation.md / ablation.json (then the plot) and each variant's checkpoint under
    ``out/<variant>/seed<k>`` (a run directory ``karma eval --run`` reads). Seeds: train.seed, train.seed + 1..."""
    from .baselines import run_baselines
    from .data import WordTokenizer
    from .evaluate import slice_masks
    from .train import build_workspace, load_dataset, pretrain_language_model, save_checkpoint, timed, train

    if num_seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {num_seeds}")
    variants = variants or list(VARIANTS)
    for name in variants:
        if name not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
    can_plot = importlib.util.find_spec("matplotlib") is not None
    if not can_plot:   # said before the work, not after it
        say("note: matplotlib is not installed, so no plot will be drawn (pip install 'karma-kernels[hf]'); "
            "the tables and JSON are written as usual")
    os.makedirs(out, exist_ok=True)
    dataset = load_dataset(config.data)
    tokenizer = WordTokenizer.build(dataset.item_texts)
    weights = {name: getattr(config.objectives, name) for name in ("action", "generation", "reconstruction", "image")}
    for name, weight in weights.items():
        if weight <= 0:
            raise ConfigError(f"objectives.{name} must be > 0 for an ablation (it is the weight that variant adds)")
    if dataset.image_features is None and "full KARMA (+image)" in variants:
        say(f"note: dataset {dataset.name!r} has no image features; the +image variant is skipped")
        variants = [v for v in variants if v != "full KARMA (+image)"]
    seeds = [config.train.seed + i for i in range(num_seeds)]
    say(f"data: {dataset.name}, {dataset.num_items} items, {dataset.num_users} users; variants are cumulative "
        f"(each adds one objective to the one before): {' -> '.join(variants)}; seed(s) {', '.join(map(str, seeds))}")

    runs = {variant: [] for variant in variants}
    pretrain_s, split, saved_config = 0.0, None, config
    for seed in seeds:
        seed_config = config.replace(train={"seed": seed})
        # One pretraining phase per seed, shared: every variant starts from the same backbone.
        pretrained = None
        if config.train.pretrain_steps:
            base = build_workspace(seed_config, dataset, tokenizer)
            curve, seconds = timed(pretrain_language_model, base)
            pretrain_s += seconds
            pretrained = copy.deepcopy(base.model.backbone.state_dict())
            say(f"seed {seed}: LM pretraining {config.train.pretrain_steps} steps in {seconds:.1f} s, "
                f"loss {curve[0]:.3f} -> {curve[-1]:.3f}")
            del base
        for variant in variants:
            objectives = {name: (weights[name] if name in VARIANTS[variant] else 0.0) for name in weights}
            variant_config = seed_config.replace(objectives=objectives, train={"pretrain_steps": 0})
            workspace = build_workspace(variant_config, dataset, tokenizer)
            split, saved_config = workspace.split, workspace.config.replace(objectives=weights)
            if pretrained is not None:
                workspace.model.backbone.load_state_dict(pretrained)
            say(f"seed {seed} {variant}:")
            history, seconds = timed(train, workspace, say=say)
            metrics, eval_s = timed(_evaluate, workspace, protocol)
            metrics.update(train_s=seconds, epochs=workspace.log["epochs_trained"])
            run_dir = os.path.join(out, slug(variant), f"seed{seed}")
            save_checkpoint(run_dir, workspace.model, None, len(history), history)
            workspace.config.save(os.path.join(run_dir, "config.json"))
            tokenizer.save(os.path.join(run_dir, "tokenizer.json"))
            say(f"  trained {workspace.log['epochs_trained']:.1f} epochs in {seconds:.1f} s, evaluated in "
                f"{eval_s:.1f} s: HR@10 {metrics['HR@10']:.4f} NDCG@10 {metrics['NDCG@10']:.4f}; checkpoint {run_dir}")
            runs[variant].append({"seed": seed, "objectives": objectives, "metrics": metrics, "history": history,
                                  "validation": workspace.log["validation"]})

    results = [summarise(variant, runs[variant]) for variant in variants]
    baseline_results = run_baselines(config.replace(train={"seed": seeds[0]}), dataset, split, baselines,
                                     protocol, say=say) if baselines != [] else []
    masks = slice_masks(split.test.target, split.train_counts)
    counts = slice_counts(masks, len(split.test))
    deltas = paired_deltas(runs, variants[0], masks) if len(variants) > 1 else {}
    title = (f"test, protocol: {protocol} (seen items {'kept' if protocol == 'kept' else 'masked'}), "
             f"{num_seeds} seed(s); baselines: seed {seeds[0]}")
    report = "\n\n".join([f"## KARMA ablation on {dataset.name} ({title})",
                          metrics_table(results + baseline_results, TABLE_COLUMNS),
                          "### per slice (cold: target with at most 2 training clicks)",
                          slice_table(results + baseline_results, counts)]
                         + ([f"### paired differences (95% interval over test users)", delta_table(deltas, variants[0])]
                            if deltas else []))
    with open(os.path.join(out, "ablation.md"), "w", encoding="utf-8") as handle:
        handle.write(report + "\n")
    for entry in results:   # per-user ranks stay in the runs, not in the means
        entry["metrics"].pop("ranks", None)
    with open(os.path.join(out, "ablation.json"), "w", encoding="utf-8") as handle:
        json.dump({"config": saved_config.to_dict(), "pretrain_s": pretrain_s, "protocol": protocol,
                   "slice_counts": counts, "results": results, "baselines": baseline_results,
                   "paired_deltas": deltas}, handle, indent=1)
    saved_config.save(os.path.join(out, "config.json"))
    say("")
    say(report)
    if can_plot:
        from .plots import plot_ablation

        plot_path = os.path.join(out, "ablation.png")
        plot_ablation(results, plot_path, title=f"KARMA ablation on {dataset.name} ({num_seeds} seed"
                      f"{'s' if num_seeds > 1 else ''})")
        say(f"\nplot: {plot_path}; table: {os.path.join(out, 'ablation.md')}")
    return results


def _evaluate(workspace, protocol: str) -> dict:
    from .evaluate import evaluate

    return evaluate(workspace.model, workspace.split.test, probe_examples=workspace.split.train.as_examples(),
                    backend=workspace.config.objectives.backend, protocol=protocol,
                    train_counts=workspace.split.train_counts)
