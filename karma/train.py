"""Training: configuration, building data + model from it, an optional LM pretraining phase on catalog text, and
the alignment loop (AdamW, clipping, bf16 autocast on GPU, seeded, tqdm, safetensors checkpoints, resume).

Budgets are in epochs (one epoch = every training window once, in a seeded shuffled order); the validation split
is scored every ``eval_every`` epochs and training stops early after ``patience`` evaluations without improvement,
keeping the best weights.

Determinism: step s draws its batch (from the permutation of its epoch) and its sampled positions and flow-matching
noise from generators seeded with (seed, s), so a run resumed from a checkpoint at step s continues exactly as the
uninterrupted run would (early-stopping bookkeeping restarts on resume).

Several processes (``torchrun --nproc-per-node N -m karma train ...``; gloo on CPU, nccl on GPU): every rank draws
the same global batch of ``train.batch_size`` rows and takes its contiguous part; the action loss sees every rank's
keys as negatives (``distributed_contrastive_loss``); gradients are averaged over ranks after backward, which
equals single-process training on the global batch; rank 0 logs (losses averaged over ranks) and checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from .data import (ConfigError, RecDataset, SyntheticConfig, WordTokenizer, check_config_fields, generate_synthetic,
                   load_movielens)
from .distributed import all_reduce_mean, average_gradients, batch_slice, init_from_env, is_main
from .losses import ObjectiveConfig, karma_losses, language_model_loss
from .model import MAX_TEXT_LEN_CAP, KarmaModel, ModelConfig, make_batch
from .split import Split, leave_one_out

DATA_SOURCES = ("synthetic", "movielens")
# early stopping watches NDCG@50 on validation: top-heavy like NDCG@10 but with less sampling noise
STOPPING_METRIC = "NDCG@50"
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class DataConfig:
    source: str = "synthetic"        # "synthetic" (embedded generator) or "movielens" (a directory, see ``path``)
    path: Optional[str] = None       # MovieLens-layout directory when source == "movielens"
    num_items: int = 1500            # synthetic sizes
    num_users: int = 800
    impression_size: int = 10
    image_dim: int = 32
    new_item_fraction: float = 0.2   # synthetic: share of new arrivals (cold items) seen only at the last steps
    seed: int = 0
    cold_item_fraction: float = 0.0  # any source: hold this share of items out of training (a cold-start split)

    SYNTHETIC_ONLY = ("num_items", "num_users", "impression_size", "image_dim", "new_item_fraction")

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source must be one of {DATA_SOURCES}, got {self.source!r}")
        if isinstance(self.cold_item_fraction, bool) or not isinstance(self.cold_item_fraction, (int, float)) \
                or not 0.0 <= self.cold_item_fraction < 1.0:
            raise ConfigError(f"data.cold_item_fraction must be in [0, 1), got {self.cold_item_fraction!r}")
        if self.source == "movielens" and not self.path:
            raise ConfigError("data.path is required when data.source is 'movielens'")

    def synthetic(self) -> SyntheticConfig:
        return SyntheticConfig(num_items=self.num_items, num_users=self.num_users,
                               impression_size=self.impression_size, image_dim=self.image_dim,
                               new_item_fraction=self.new_item_fraction, seed=self.seed)

    def to_dict(self) -> dict:
        """The fields that apply to this source (a MovieLens run records no synthetic sizes)."""
        values = dataclasses.asdict(self)
        if self.source != "synthetic":
            for name in self.SYNTHETIC_ONLY:
                values.pop(name)
        return values


@dataclass
class TrainConfig:
    epochs: float = 30.0             # the budget: passes over the training windows (early stopping may end sooner)
    steps: int = 0                   # > 0: a fixed number of steps instead of epochs (no early stopping)
    batch_size: int = 64             # user windows per step (every position of each predicts its next click)
    lr: float = 2e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 20
    eval_every: float = 2.0          # epochs between validation scores (0: no validation, no early stopping)
    patience: int = 3                # validation scores without improvement before stopping
    pretrain_steps: int = 100        # LM pretraining on catalog text before alignment (0: none)
    pretrain_lr: float = 3e-3
    num_hard_negatives: int = 9      # shown-not-clicked items per click used as negatives
    seed: int = 0
    device: str = "auto"             # "auto": cuda when available, else cpu
    precision: str = "auto"          # "auto": bf16 autocast on cuda, fp32 on cpu
    log_every: int = 25
    checkpoint_every: int = 0        # 0: only at the end (when a run directory is given)
    progress: bool = True            # tqdm bars (only when stderr is a terminal)

    def __post_init__(self):
        for name in ("batch_size", "log_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        for name in ("steps", "warmup_steps", "pretrain_steps", "num_hard_negatives", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"train.{name} must be an integer >= 0, got {value!r}")
        for name in ("epochs", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"train.{name} must be a number >= 0, got {value!r}")
        if self.steps == 0 and self.epochs <= 0:
            raise ConfigError("train.epochs must be > 0 (or train.steps > 0)")
        for name in ("lr", "pretrain_lr"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.weight_decay and train.grad_clip must be >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ConfigError(f"train.device: {exc}") from None

    def steps_per_epoch(self, num_windows: int) -> int:
        return max(1, math.ceil(num_windows / self.batch_size))

    def total_steps(self, num_windows: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * self.steps_per_epoch(num_windows)))


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    SECTIONS = {"data": DataConfig, "model": ModelConfig, "objectives": ObjectiveConfig, "train": TrainConfig}

    @classmethod
    def from_dict(cls, values: dict) -> "ExperimentConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"config: expected a mapping with sections {sorted(cls.SECTIONS)}")
        for name in values:
            if name not in cls.SECTIONS:
                raise ConfigError(f"config: unknown section {name!r} (known: {', '.join(sorted(cls.SECTIONS))})")
        return cls(**{name: check_config_fields(name, section, values.get(name, {}))
                      for name, section in cls.SECTIONS.items()})

    @classmethod
    def tiny(cls) -> "ExperimentConfig":
        """A seconds-long configuration for smoke tests and CI (tiny catalog, one-layer backbone)."""
        return cls.from_dict({
            "data": {"num_items": 60, "num_users": 40, "impression_size": 5, "image_dim": 8},
            "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "embed_dim": 16,
                      "max_history": 8, "max_text_len": 8, "flow_hidden": 32},
            "train": {"steps": 6, "batch_size": 16, "pretrain_steps": 2, "num_hard_negatives": 4, "log_every": 3,
                      "warmup_steps": 2, "progress": False},
        })

    def to_dict(self) -> dict:
        return {name: (getattr(self, name).to_dict() if name == "data" else dataclasses.asdict(getattr(self, name)))
                for name in self.SECTIONS}

    def replace(self, **sections: dict) -> "ExperimentConfig":
        """A copy with some fields changed, e.g. ``replace(train={"steps": 10})``; validated like from_dict."""
        values = {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}
        for name, changes in sections.items():
            if name not in self.SECTIONS:
                raise ConfigError(f"config: unknown section {name!r}")
            values[name].update(changes)
        return ExperimentConfig.from_dict(values)

    @classmethod
    def load(cls, path: str) -> "ExperimentConfig":
        with open(path, "r", encoding="utf-8") as handle:
            try:
                values = json.load(handle)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return cls.from_dict(values)

    def save(self, path: str):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# Building data and model
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Workspace:
    """Everything an experiment trains and evaluates on. ``log`` collects what training reports besides the loss
    history (validation scores, the epoch it stopped at)."""
    config: ExperimentConfig
    dataset: RecDataset
    tokenizer: WordTokenizer
    split: Split
    model: KarmaModel
    device: torch.device
    log: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        # Under torchrun each process takes the GPU of its LOCAL_RANK.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
            torch.device("cpu")
    return torch.device(name)


def load_dataset(config: DataConfig) -> RecDataset:
    if config.source == "movielens":
        return load_movielens(config.path)
    return generate_synthetic(config.synthetic())


def text_length(tokenizer: WordTokenizer, texts: List[str], configured: Optional[int]) -> int:
    """``configured``, or the 95th percentile of the item texts' token counts (eos included) capped at
    MAX_TEXT_LEN_CAP; warns with counts when texts are cut."""
    lengths = np.array([len(tokenizer.encode(text)) for text in texts])
    length = configured or int(min(MAX_TEXT_LEN_CAP, max(2, math.ceil(np.percentile(lengths, 95)))))
    cut = int((lengths > length).sum())
    if cut:
        warnings.warn(f"model.max_text_len={length}: {cut} of {len(texts)} item texts are longer and are cut "
                      f"(longest {lengths.max()} tokens incl. eos; median {int(np.median(lengths))})", stacklevel=2)
    return length


def split_dataset(config: ExperimentConfig, dataset: RecDataset) -> Split:
    """The leave-one-out split the configuration asks for (history length, hard negatives, cold items)."""
    return leave_one_out(dataset, config.model.max_history, config.train.num_hard_negatives,
                         config.data.cold_item_fraction, config.data.seed)


def build_workspace(config: ExperimentConfig, dataset: Optional[RecDataset] = None,
                    tokenizer: Optional[WordTokenizer] = None) -> Workspace:
    """Data, tokenizer, split and a freshly initialised model (initialisation seeded by ``train.seed``).
    ``model.max_text_len`` = None is resolved from the data here (the returned config records the value)."""
    dataset = dataset if dataset is not None else load_dataset(config.data)
    tokenizer = tokenizer if tokenizer is not None else WordTokenizer.build(dataset.item_texts)
    length = text_length(tokenizer, dataset.item_texts, config.model.max_text_len)
    if config.model.max_text_len != length:
        config = config.replace(model={"max_text_len": length})
    split = split_dataset(config, dataset)
    device = resolve_device(config.train.device)
    item_tokens = torch.as_tensor(tokenizer.encode_batch(dataset.item_texts, length))
    images = torch.as_tensor(dataset.image_features) if dataset.image_features is not None else None
    torch.manual_seed(config.train.seed)
    model = KarmaModel(config.model, len(tokenizer), tokenizer.pad_id, item_tokens, images, device).to(device)
    return Workspace(config, dataset, tokenizer, split, model, device)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors: model weights, optimizer tensors; JSON: step, history, optimizer hyper-parameters)
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(directory: str, model: KarmaModel, optimizer: Optional[torch.optim.Optimizer], step: int,
                    history: List[dict]):
    from safetensors.torch import save_file, save_model

    os.makedirs(directory, exist_ok=True)
    save_model(model, os.path.join(directory, "model.safetensors"))
    state = {"step": step, "history": history}
    if optimizer is not None:
        optim_state = optimizer.state_dict()
        tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
                   for index, entries in optim_state["state"].items() for name, value in entries.items()
                   if isinstance(value, torch.Tensor)}
        save_file(tensors, os.path.join(directory, "optimizer.safetensors"))
        state["param_groups"] = optim_state["param_groups"]
    with open(os.path.join(directory, "trainer_state.json"), "w", encoding="utf-8") as handle:
        json.dump(state, handle)


def load_checkpoint(directory: str, model: KarmaModel, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load weights (and optimizer state) saved by :func:`save_checkpoint`; returns the trainer state."""
    from safetensors.torch import load_file, load_model

    weights = os.path.join(directory, "model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"no checkpoint in {directory!r} (expected model.safetensors)")
    missing, unexpected = load_model(model, weights, strict=False, device=str(next(model.parameters()).device))
    if missing or unexpected:
        raise ValueError(f"checkpoint {weights} does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]} (was it trained with another model config?)")
    with open(os.path.join(directory, "trainer_state.json"), "r", encoding="utf-8") as handle:
        state = json.load(handle)
    if optimizer is not None and "param_groups" in state:
        tensors = load_file(os.path.join(directory, "optimizer.safetensors"))
        per_param: Dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    return state


# ----------------------------------------------------------------------------------------------------------------
# Loops
# ----------------------------------------------------------------------------------------------------------------
def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step])


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(int(step_rng(seed, step, stream).integers(0, 2 ** 62)))


def local_slice(batch_size: int, env) -> slice:
    """This rank's contiguous part of a global batch drawn identically on every rank."""
    if env.distributed and batch_size % env.world_size:
        raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by the number of processes "
                          f"({env.world_size}) so that the mean over ranks is the mean over the batch")
    return batch_slice(batch_size, env.rank, env.world_size)


def local_rows(rows: np.ndarray, env) -> np.ndarray:
    return rows[local_slice(len(rows), env)]


def noise_stream(env) -> int:
    # Rank 0 keeps stream 0 (so one process reproduces the single-process run); other ranks get their own noise.
    return 0 if env.rank == 0 else 1000 + env.rank


def autocast_context(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at ``total_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def show_progress(enabled: bool) -> bool:
    """Bars only on a terminal: a redirected log gets one line per validation instead of bar redraws."""
    return enabled and is_main() and sys.stderr.isatty()


def _progress(total: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=description, leave=False, dynamic_ncols=True)


def pretrain_language_model(workspace: Workspace, backend: Optional[str] = None) -> List[float]:
    """Short LM pretraining of the backbone on catalog text, so it knows the items before alignment."""
    config = workspace.config.train
    model = workspace.model
    backend = backend or workspace.config.objectives.backend
    if config.pretrain_steps == 0:
        return []
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.pretrain_lr, weight_decay=config.weight_decay)
    num_items = model.item_tokens.shape[0]
    bos_id = workspace.tokenizer.bos_id
    env = init_from_env()
    curve, pending = [], []
    model.train()
    with _progress(config.pretrain_steps, show_progress(config.progress), "pretrain LM") as bar:
        for step in range(config.pretrain_steps):
            rows = local_rows(step_rng(config.seed, step, stream=1).integers(0, num_items, config.batch_size), env)
            rows = torch.as_tensor(rows, device=workspace.device)
            with autocast_context(workspace.device, config.precision):
                loss = language_model_loss(model, model.item_tokens[rows], bos_id, backend)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            pending.append(loss.detach())
            if len(pending) == config.log_every or step == config.pretrain_steps - 1:
                # one sync (and one collective) per log interval
                curve.extend(all_reduce_mean(torch.stack(pending).float()).cpu().tolist())
                pending = []
                bar.set_postfix(lm=f"{curve[-1]:.3f}")
            bar.update(1)
    return curve


def make_optimizer(model: KarmaModel, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def epoch_rows(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    return step_rng(seed, epoch, stream=2).permutation(num_windows)


def train(workspace: Workspace, run_dir: Optional[str] = None, resume: bool = False, say=None) -> List[dict]:
    """Align the model with the configured objectives. Returns the loss history: one dict per step with every
    active objective and the total. With ``run_dir`` checkpoints go there; ``resume`` continues from the last one.
    Validation scores and where training stopped go to ``workspace.log``; ``say`` (e.g. print) gets one line per
    validation."""
    from .evaluate import validation_score

    config, objectives = workspace.config.train, workspace.config.objectives
    model, windows = workspace.model, workspace.split.train
    env = init_from_env()
    say = say if say is not None and is_main() else (lambda *_: None)
    optimizer = make_optimizer(model, config)
    per_epoch = config.steps_per_epoch(len(windows))
    total = config.total_steps(len(windows))
    validate_every = 0 if config.steps or not config.eval_every else max(1, round(config.eval_every * per_epoch))
    start, history = 0, []
    if resume:
        if run_dir is None or not os.path.exists(os.path.join(run_dir, "trainer_state.json")):
            raise FileNotFoundError(f"resume: no checkpoint in {run_dir!r}")
        state = load_checkpoint(run_dir, model, optimizer)
        start, history = state["step"], state["history"]
    elif config.pretrain_steps and (model.uses_text or objectives.generation or objectives.reconstruction):
        pretrain_language_model(workspace)

    names = objectives.active()
    pending: List[torch.Tensor] = []
    validation, best, best_state, waited = [], -1.0, None, 0
    order, order_epoch = None, -1
    model.train()
    epochs = total / per_epoch
    with _progress(total - start, show_progress(config.progress), "align") as bar:
        for step in range(start, total):
            epoch, index = divmod(step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_rows(config.seed, epoch, len(windows)), epoch
                bar.set_description(f"epoch {epoch + 1}/{epochs:.4g}")
            rows = order[(index * config.batch_size + np.arange(config.batch_size)) % len(order)]
            batch = make_batch(windows, rows, workspace.device, rng=step_rng(config.seed, step, stream=3),
                               local=local_slice(len(rows), env))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step, total)
            generator = step_generator(config.seed, step, noise_stream(env))
            with autocast_context(workspace.device, config.precision):
                losses = karma_losses(model, batch, objectives, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            average_gradients(model.parameters())
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            pending.append(torch.stack([losses[n].detach().float() for n in names + ["total"]]))
            last = step == total - 1
            validate = validate_every and ((step + 1) % validate_every == 0 or last)
            checkpoint_due = run_dir is not None and (
                last or (config.checkpoint_every > 0 and (step + 1) % config.checkpoint_every == 0))
            if len(pending) == config.log_every or last or checkpoint_due or validate:
                # one sync (and one collective) per log interval
                for values in all_reduce_mean(torch.stack(pending)).cpu().tolist():
                    history.append({"step": len(history), **dict(zip(names + ["total"], values))})
                pending = []
                bar.set_postfix({n: f"{history[-1][n]:.3f}" for n in names})
            stop = False
            if validate:
                score = validation_score(model, workspace.split.valid)
                validation.append({"step": step + 1, "epoch": (step + 1) / per_epoch, **score})
                improved = score[STOPPING_METRIC] > best
                if improved:
                    best, waited = score[STOPPING_METRIC], 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    waited += 1
                stop = waited >= config.patience
                say(f"  epoch {(step + 1) / per_epoch:.1f}: loss {history[-1]['total']:.4f}, valid "
                    f"HR@10 {score['HR@10']:.4f} {STOPPING_METRIC} {score[STOPPING_METRIC]:.4f}"
                    + (" (best)" if improved else "")
                    + (f"; stopping, no improvement in {waited} validations" if stop else ""))
                model.train()
            if (checkpoint_due or stop) and run_dir is not None and is_main():
                save_checkpoint(run_dir, model, optimizer, step + 1, history)
            bar.update(1)
            if stop:
                break
    best_step = max(validation, key=lambda v: v[STOPPING_METRIC])["step"] if validation else len(history)
    if best_state is not None:
        model.load_state_dict(best_state)
        if run_dir is not None and is_main():   # the run directory holds the weights that are evaluated
            save_checkpoint(run_dir, model, None, best_step, history)
    workspace.log.update(validation=validation, steps=len(history), total_steps=total, steps_per_epoch=per_epoch,
                         epochs_trained=len(history) / per_epoch, best_step=best_step)
    return history


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
