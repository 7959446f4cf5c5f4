"""The dataset container every loader returns, and the data layer's error types and config check."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np


class DataFormatError(ValueError):
    """A data file does not have the expected layout; the message names the file and the line."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def check_config_fields(section: str, cls, values: dict):
    """Build dataclass ``cls`` from ``values``, naming ``section.field`` for an unknown or mistyped field."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of field names to values, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{section}.{name}: unknown field (known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except TypeError as exc:  # a wrong type surfacing from __post_init__ arithmetic
        raise ConfigError(f"{section}: {exc}") from exc

# ----------------------------------------------------------------------------------------------------------------
# Dataset containers
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RecDataset:
    """Items (text, optional image feature) and each user's clicks in time order.

    ``impressions[u][t]`` are the items shown but not clicked at the user's t-th click (hard negatives), or an
    empty tuple where the log has no impressions (MovieLens).
    """
    name: str
    item_texts: List[str]
    sequences: List[List[int]]
    impressions: List[List[Tuple[int, ...]]]
    image_features: Optional[np.ndarray] = None  # [num_items, image_dim] float32
    item_attributes: Optional[Dict[str, np.ndarray]] = None  # synthetic only: attribute index per item

    @property
    def num_items(self) -> int:
        return len(self.item_texts)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def has_impressions(self) -> bool:
        return any(len(shown) > 0 for user in self.impressions for shown in user)
