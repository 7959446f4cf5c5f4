"""Building an experiment from its configuration (data, tokenizer, split, model: a ``Workspace``) and its
safetensors checkpoints."""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from .config import DataConfig, ExperimentConfig
from .data import RecDataset, WordTokenizer, generate_synthetic, load_movielens
from .model import MAX_TEXT_LEN_CAP, KarmaModel
from .split import Split, leave_one_out


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
