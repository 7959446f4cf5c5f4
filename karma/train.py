"""Training: an optional LM pretraining phase on catalog text, and the alignment loop (AdamW, clipping, bf16
autocast on GPU, seeded, tqdm, safetensors checkpoints, resume). The configuration is ``karma.config``; building
data, split and model from it, and the checkpoints, ``karma.workspace`` (both re-exported here).

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

import math
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from .config import (DATA_SOURCES, PRECISIONS, STOPPING_METRIC, DataConfig, ExperimentConfig,  # noqa: F401
                     TrainConfig)
from .data import ConfigError
from .distributed import all_reduce_mean, average_gradients, batch_slice, init_from_env, is_main
from .losses import karma_losses, language_model_loss
from .model import KarmaModel, make_batch
from .workspace import (Workspace, build_workspace, load_checkpoint, load_dataset, resolve_device,  # noqa: F401
                        save_checkpoint, split_dataset, text_length)

__all__ = ["DATA_SOURCES", "PRECISIONS", "STOPPING_METRIC", "DataConfig", "ExperimentConfig", "TrainConfig",
           "Workspace", "build_workspace", "load_checkpoint", "load_dataset", "resolve_device", "save_checkpoint",
           "split_dataset", "text_length", "pretrain_language_model", "train", "timed"]

# ----------------------------------------------------------------------------------------------------------------
# Loops
# ----------------------------------------------------------------------------------------------------------------
def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step])


def step_generator(seed: int, step: int, stream: int = 0,
                   device: torch.device = torch.device("cpu")) -> torch.Generator:
    """A torch generator on ``device`` (where the model draws its flow-matching noise), seeded by (seed, stream,
    step)."""
    return torch.Generator(device=device).manual_seed(int(step_rng(seed, step, stream).integers(0, 2 ** 62)))


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
            generator = step_generator(config.seed, step, noise_stream(env), workspace.device)
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
