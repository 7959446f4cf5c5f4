"""``karma train``, ``karma eval`` and ``karma ablate``.

Configuration: defaults (``karma.train.ExperimentConfig``), then ``--config FILE.json`` (sections data, model,
objectives, train), then shortcuts (``--steps``, ``--data``...), then ``--set section.field=value`` (value parsed as
JSON when it parses, else taken as a string). Every value is validated; an error names the field.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import TYPE_CHECKING, List, Optional, Sequence

from .data import ConfigError

if TYPE_CHECKING:  # the heavy imports (torch, transformers) wait until a command runs
    from .train import ExperimentConfig

TABLE_COLUMNS = ["HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@50", "NDCG@200", "AUC", "decodability",
                 "probe_decodability", "sink_ratio", "image_cos", "train_s"]
VARIANTS = {
    "action-only": ("action",),
    "+generation": ("action", "generation"),
    "+reconstruction": ("action", "generation", "reconstruction"),
    "full KARMA (+image)": ("action", "generation", "reconstruction", "image"),
}


def parse_overrides(pairs: Sequence[str]) -> dict:
    sections: dict = {}
    for pair in pairs:
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise ConfigError(f"--set {pair!r}: expected section.field=value, e.g. model.hidden_size=32")
        key, raw = pair.split("=", 1)
        section, name = key.split(".", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        sections.setdefault(section, {})[name] = value
    return sections


def build_config(args) -> "ExperimentConfig":
    from .train import ExperimentConfig

    if getattr(args, "config", None):
        config = ExperimentConfig.load(args.config)
    else:
        config = ExperimentConfig.tiny() if getattr(args, "preset", None) == "tiny" else ExperimentConfig()
    shortcuts: dict = {}
    if getattr(args, "data", None):
        shortcuts.setdefault("data", {})["source"] = args.data
    if getattr(args, "data_path", None):
        shortcuts.setdefault("data", {})["path"] = args.data_path
        shortcuts["data"].setdefault("source", "movielens")
    if getattr(args, "steps", None) is not None:
        shortcuts.setdefault("train", {})["steps"] = args.steps
    if getattr(args, "seed", None) is not None:
        shortcuts.setdefault("train", {})["seed"] = args.seed
    if getattr(args, "backend", None):
        shortcuts.setdefault("objectives", {})["backend"] = args.backend
    if getattr(args, "action_mode", None):
        shortcuts.setdefault("objectives", {})["action_mode"] = args.action_mode
    if getattr(args, "quiet", False):
        shortcuts.setdefault("train", {})["progress"] = False
    for section, values in parse_overrides(getattr(args, "set", None) or []).items():
        shortcuts.setdefault(section, {}).update(values)
    return config.replace(**shortcuts) if shortcuts else config


def _drop_image_without_images(config, dataset, say):
    if dataset.image_features is None and config.objectives.image > 0:
        say(f"note: dataset {dataset.name!r} has no image features; objectives.image set to 0")
        return config.replace(objectives={"image": 0.0})
    return config


def _save_run_files(out: str, config, tokenizer):
    os.makedirs(out, exist_ok=True)
    config.save(os.path.join(out, "config.json"))
    tokenizer.save(os.path.join(out, "tokenizer.json"))


def _print_metrics(metrics: dict, say):
    for name, value in metrics.items():
        say(f"  {name:>14}: {value:.4f}" if isinstance(value, float) else f"  {name:>14}: {value}")


# ----------------------------------------------------------------------------------------------------------------
def command_train(args, say=print) -> dict:
    from .data import WordTokenizer
    from .distributed import cleanup, init_from_env, is_main
    from .evaluate import evaluate
    from .train import build_workspace, load_dataset, timed, train

    env = init_from_env()  # a no-op unless started by torchrun with several processes
    if not is_main():
        def say(*_):
            pass
    config = build_config(args)
    dataset = load_dataset(config.data)
    config = _drop_image_without_images(config, dataset, say)
    tokenizer = None
    if args.resume:
        if not os.path.exists(os.path.join(args.out, "trainer_state.json")):
            raise FileNotFoundError(f"--resume: no checkpoint in {args.out!r} (run karma train --out {args.out} first)")
        tokenizer = WordTokenizer.load(os.path.join(args.out, "tokenizer.json"))
    workspace = build_workspace(config, dataset, tokenizer)
    if is_main():
        _save_run_files(args.out, config, workspace.tokenizer)
    say(f"data: {dataset.name}, {dataset.num_items} items, {dataset.num_users} users, "
        f"{len(workspace.split.train)} training examples; objectives: {', '.join(config.objectives.active())}"
        + (f"; {env.world_size} processes" if env.distributed else ""))
    history, seconds = timed(train, workspace, run_dir=args.out, resume=args.resume)
    if env.distributed:
        cleanup()  # rank 0 evaluates alone; after cleanup is_main() is true everywhere, so ask env.rank
        if env.rank != 0:
            return {}
    metrics = evaluate(workspace.model, workspace.split.test, probe_examples=workspace.split.train,
                       backend=config.objectives.backend)
    metrics["train_s"] = seconds
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump({"test": metrics, "history": history}, handle, indent=1)
    say(f"trained {config.train.steps} steps in {seconds:.1f} s; checkpoint in {args.out}; test metrics:")
    _print_metrics(metrics, say)
    return metrics


def command_eval(args, say=print) -> dict:
    from .data import WordTokenizer
    from .evaluate import evaluate
    from .train import ExperimentConfig, build_workspace, load_checkpoint, load_dataset

    config_path = os.path.join(args.run, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{args.run!r} is not a run directory (no config.json; create one with karma train)")
    config = ExperimentConfig.load(config_path)
    dataset = load_dataset(config.data)
    workspace = build_workspace(config, dataset, WordTokenizer.load(os.path.join(args.run, "tokenizer.json")))
    load_checkpoint(args.run, workspace.model)
    examples = getattr(workspace.split, args.split)
    metrics = evaluate(workspace.model, examples, num_shards=args.shards, probe_examples=workspace.split.train,
                       backend=config.objectives.backend)
    say(f"{args.split} metrics of {args.run} ({len(examples)} examples):")
    _print_metrics(metrics, say)
    return metrics


def summarise(variant: str, runs: List[dict]) -> dict:
    """One variant over seeds: mean metrics, their standard deviation, the first seed's loss history."""
    import numpy as np

    names = runs[0]["metrics"].keys()
    values = {name: np.array([run["metrics"][name] for run in runs], dtype=np.float64) for name in names}
    return {"variant": variant, "objectives": runs[0]["objectives"], "seeds": [run["seed"] for run in runs],
            "metrics": {name: float(v.mean()) for name, v in values.items()},
            "metrics_std": {name: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for name, v in values.items()},
            "history": runs[0]["history"], "runs": runs}


def run_ablation(config, out: str, variants: Optional[List[str]] = None, say=print, num_seeds: int = 1) -> List[dict]:
    """Train every variant from the same seed, data, pretrained backbone and step budget; evaluate on test.
    With ``num_seeds`` > 1 the whole ablation repeats for seeds train.seed, train.seed + 1, ... and the table
    shows mean ± standard deviation."""
    from .data import WordTokenizer
    from .evaluate import evaluate
    from .plots import metrics_table, plot_ablation
    from .train import build_workspace, load_dataset, pretrain_language_model, timed, train

    if num_seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {num_seeds}")
    variants = variants or list(VARIANTS)
    for name in variants:
        if name not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
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
    say(f"data: {dataset.name}, {dataset.num_items} items, {dataset.num_users} users; "
        f"{config.train.steps} alignment steps per variant, seed(s) {', '.join(map(str, seeds))}")

    runs = {variant: [] for variant in variants}
    pretrain_s = 0.0
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
            if pretrained is not None:
                workspace.model.backbone.load_state_dict(pretrained)
            history, seconds = timed(train, workspace)
            metrics, eval_s = timed(evaluate, workspace.model, workspace.split.test,
                                    probe_examples=workspace.split.train, backend=variant_config.objectives.backend)
            metrics["train_s"] = seconds
            say(f"seed {seed} {variant}: trained in {seconds:.1f} s, evaluated in {eval_s:.1f} s; "
                f"HR@200 {metrics['HR@200']:.4f}")
            runs[variant].append({"seed": seed, "objectives": objectives, "metrics": metrics, "history": history})

    results = [summarise(variant, runs[variant]) for variant in variants]
    table = metrics_table(results, TABLE_COLUMNS)
    plot_path = os.path.join(out, "ablation.png")
    plot_ablation(results, plot_path, title=f"KARMA ablation on {dataset.name} ({config.train.steps} steps, "
                  f"{num_seeds} seed{'s' if num_seeds > 1 else ''})")
    with open(os.path.join(out, "ablation.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    with open(os.path.join(out, "ablation.json"), "w", encoding="utf-8") as handle:
        json.dump({"config": config.to_dict(), "pretrain_s": pretrain_s, "results": results}, handle, indent=1)
    config.save(os.path.join(out, "config.json"))
    say("")
    say(table)
    say(f"\nplot: {plot_path}; table: {os.path.join(out, 'ablation.md')}")
    return results


def command_ablate(args, say=print) -> List[dict]:
    return run_ablation(build_config(args), args.out, args.variants, say, num_seeds=args.seeds)


# ----------------------------------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser):
    parser.add_argument("--config", help="JSON file with sections data, model, objectives, train")
    parser.add_argument("--preset", choices=["default", "tiny"], default="default",
                        help="starting configuration when no --config is given (tiny: a seconds-long smoke run)")
    parser.add_argument("--data", choices=["synthetic", "movielens"], help="data source (default: synthetic)")
    parser.add_argument("--data-path", help="MovieLens-layout directory (u.data + u.item, or .inter + .item)")
    parser.add_argument("--steps", type=int, help="alignment steps (train.steps)")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("--backend", choices=["auto", "triton", "torch", "reference"], help="karma_kernels backend")
    parser.add_argument("--action-mode", choices=["softmax", "pairwise"], help="objectives.action_mode")
    parser.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override one config field")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the default tiny model gains nothing from more, and extra "
                             "OpenMP threads slow it down many times on a busy machine; 0 = torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="karma", description="KARMA: LLM next-interest embeddings kept semantic "
                                     "by generation and reconstruction objectives")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one model (all objectives with weight > 0)")
    _common(train)
    train.add_argument("--out", default=os.path.join("runs", "train"), help="run directory (checkpoints, metrics)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    evaluate = commands.add_parser("eval", help="evaluate a trained run directory")
    evaluate.add_argument("--run", default=os.path.join("runs", "train"), help="run directory from karma train")
    evaluate.add_argument("--split", choices=["test", "valid"], default="test")
    evaluate.add_argument("--shards", type=int, default=4, help="number of index shards")
    evaluate.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's choice)")
    ablate = commands.add_parser("ablate", help="action-only vs +generation vs +reconstruction vs full KARMA")
    _common(ablate)
    ablate.add_argument("--out", default=os.path.join("runs", "ablate"), help="output directory (table, plot, json)")
    ablate.add_argument("--variants", nargs="+", metavar="NAME", help=f"subset of: {', '.join(VARIANTS)}")
    ablate.add_argument("--seeds", type=int, default=1, help="repeat for this many seeds; table shows mean ± std")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": command_train, "eval": command_eval, "ablate": command_ablate}
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        handlers[args.command](args)
    except (ValueError, FileNotFoundError) as exc:  # config, data-format and backend errors: say what, no traceback
        print(f"karma {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(f"karma {args.command}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
