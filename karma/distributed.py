"""Helpers for running ``karma train`` under ``torchrun --nproc-per-node N``.

``init_from_env`` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
and starts the default process group: nccl when CUDA is available, gloo otherwise. Without WORLD_SIZE, or with
WORLD_SIZE=1, nothing is started and every helper here behaves as the single-process case, so the same training
code runs with and without torchrun.

A training loop uses them like this::

    env = init_from_env()
    model = wrap_ddp(model.to(env.device))          # or keep the model and call average_gradients after backward
    rows = shard_indices(len(dataset), env.rank, env.world_size, seed=epoch)   # this rank's examples, or
    rows = global_rows[batch_slice(len(global_rows), env.rank, env.world_size)]  # its part of a shared draw
    ...
    loss = distributed_contrastive_loss(h, keys, process_group=None)          # cross-rank negatives
    loss.backward(); average_gradients(model.parameters()); optimizer.step()   # (DDP averages by itself)
    if is_main(): log(...); save(unwrap(model).state_dict())
    cleanup()
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group was started

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def process_group(self):
        """The group for collectives (None = the default group; ops treat a missing group as one rank)."""
        return None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_from_env(backend: Optional[str] = None, *, timeout_s: float = 600.0) -> DistEnv:
    """Start the default process group from torchrun's environment; a no-op for a single process.

    ``backend`` overrides the choice (nccl with CUDA, gloo without). On CUDA each process uses the GPU
    ``LOCAL_RANK``. Calling it again once a group exists returns the current environment.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size <= 1:
        if use_cuda:
            torch.cuda.set_device(device)
        return DistEnv(0, 1, 0, device, None)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    chosen = backend or ("nccl" if use_cuda else "gloo")
    if chosen == "nccl" and not use_cuda:
        raise ValueError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
    if use_cuda:
        torch.cuda.set_device(device)
    init_kwargs = dict(backend=chosen, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    if chosen == "nccl":
        init_kwargs["device_id"] = device  # binds the communicator eagerly; avoids a hang on the first barrier
    dist.init_process_group(**init_kwargs)
    return DistEnv(rank, world_size, local_rank, device, chosen)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard_indices(n: int, rank: int, world: int, *, seed: Optional[int] = None, drop_last: bool = False
                  ) -> List[int]:
    """The example indices rank ``rank`` of ``world`` reads from a dataset of ``n`` examples.

    Every rank gets the same number of indices (DDP needs the same number of steps on every rank): the list is
    padded by wrapping around to ceil(n / world) per rank, or cut to floor(n / world) with ``drop_last``.
    ``seed`` shuffles the order identically on every rank (pass the epoch to reshuffle each epoch).
    Ranks take strided positions, so with ``world=1`` the result is simply ``range(n)`` (or its shuffle).
    """
    if n < 0:
        raise ValueError(f"shard_indices: n must be >= 0, got {n}")
    if world < 1:
        raise ValueError(f"shard_indices: world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"shard_indices: rank must be in [0, {world}), got {rank}")
    if seed is None:
        order = list(range(n))
    else:
        generator = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(n, generator=generator).tolist()
    if n == 0:
        return []
    if drop_last:
        per_rank = n // world
        order = order[:per_rank * world]
    else:
        per_rank = -(-n // world)
        total = per_rank * world
        while len(order) < total:
            order = order + order[:total - len(order)]
    return order[rank::world]


def wrap_ddp(module: torch.nn.Module, **ddp_kwargs) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel when a multi-rank group is running; else unchanged.

    On CUDA the module must already be on this rank's GPU; ``device_ids`` is set to it.
    """
    if world_size() <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if "device_ids" not in ddp_kwargs:
        param = next(module.parameters(), None)
        if param is not None and param.device.type == "cuda":
            ddp_kwargs["device_ids"] = [param.device.index]
    return DistributedDataParallel(module, **ddp_kwargs)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (what checkpoints should save), or ``module`` itself."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def batch_slice(global_batch_size: int, rank: int, world: int) -> slice:
    """This rank's rows of a global batch drawn identically on every rank (e.g. from a (seed, step) generator).

    Contiguous, in rank order, sizes differing by at most one; so ranks together see exactly the single-process
    batch, and (with equal sizes) the mean of the ranks' mean losses is the single-process mean loss.
    """
    if global_batch_size < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"batch_slice: need global_batch_size >= 0 and 0 <= rank < world, got "
                         f"({global_batch_size}, {rank}, {world})")
    base, extra = divmod(global_batch_size, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def average_gradients(parameters, *, bucket_bytes: int = 25 * 1024 * 1024) -> None:
    """All-reduce the ``.grad`` of ``parameters`` and divide by the world size: what DDP does after backward,
    for models whose losses call several of their methods (not one ``forward``), which DDP cannot hook.

    Gradients are flattened into buckets of about ``bucket_bytes`` per dtype and device, one all-reduce each.
    Parameters without a gradient are skipped; every rank must have the same set (the same graph). A no-op with
    one process.
    """
    world = world_size()
    if world <= 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    buckets: dict = {}
    for grad in grads:
        if grad.is_sparse:
            raise ValueError("average_gradients: sparse gradients are not supported")
        buckets.setdefault((grad.dtype, grad.device), []).append(grad)
    for (dtype, _), same_kind in sorted(buckets.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        bucket, size = [], 0
        for grad in same_kind + [None]:
            if grad is not None:
                bucket.append(grad)
                size += grad.numel() * grad.element_size()
            if bucket and (grad is None or size >= bucket_bytes):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat /= world
                at = 0
                for g in bucket:
                    g.copy_(flat[at:at + g.numel()].view_as(g))
                    at += g.numel()
                bucket, size = [], 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (for logging a loss on rank 0); the value itself with one rank."""
    if world_size() <= 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def cleanup() -> None:
    """Tear down the process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
