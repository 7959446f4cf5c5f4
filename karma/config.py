"""The experiment configuration: sections ``data``, ``model`` (``karma.model.ModelConfig``), ``objectives``
(``karma.losses.ObjectiveConfig``) and ``train``; every field validated, an error names ``section.field``."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .data import ConfigError, SyntheticConfig, check_config_fields
from .losses import ObjectiveConfig
from .model import ModelConfig

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
