"""Process and device helpers: which device to train on, and rank-aware printing.

Under torchrun every process sees RANK/WORLD_SIZE; only rank 0 prints. Multi-process training (DDP,
used by `train/lm.py`'s `pretrain_fit`) builds on these helpers; a single process is rank 0 of a world
of one, and every collective below is then a no-op.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def rank() -> int:
    """This process's rank under torchrun, 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process should print and write files."""
    return rank() == 0


def log(message: str) -> None:
    """Print a line on the main process only (to stderr, so stdout stays clean for data)."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def pick_device(name: str = "auto") -> torch.device:
    """The device to use: 'auto' prefers CUDA, then Apple's MPS, then the CPU.

    Raises:
        ValueError: when the named device is not available here.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "train.device: 'cuda' was asked for but no CUDA device is available; use auto or cpu"
        )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("train.device: 'mps' was asked for but MPS is not available; use auto or cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------- process group


def world_size() -> int:
    """How many processes train together (torchrun's WORLD_SIZE), 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK), 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    """Whether a process group of more than one process is up."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_rank_and_size() -> tuple[int, int]:
    """(this rank, how many ranks) of the process group that is up; (0, 1) without one."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel when a process group is up (gradients all-reduced in
    the backward pass), else `model` itself. The optimizer and evaluation keep using `model`."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_model(
    model: torch.nn.Module, groups: list[torch.nn.Module], device: torch.device
) -> torch.nn.Module:
    """Shard `model` in place over the process group with FSDP2 (`fully_shard`) and move the shards to
    `device`: each of `groups` (e.g. the Transformer blocks) is all-gathered just for its own forward
    and backward, the rest with the root. Parameters, gradients and optimizer state then live 1/world
    on each process (the whole model never goes to the device); build the optimizer after this.
    Gradients are averaged over the ranks, as under DDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    for group in groups:
        fully_shard(group, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded by `shard_model` (its parameters are DTensors)."""
    return hasattr(model, "set_requires_gradient_sync")


def sync_gradients(model: torch.nn.Module, now: bool) -> contextlib.AbstractContextManager:
    """The context for one micro-batch's backward pass: a DDP `model` (also compiled) all-reduces the
    gradients only when `now` (the step's last micro-batch); `no_sync` holds them back before that.
    A sharded (FSDP2) model reduce-scatters every micro-batch's: held back, they would be whole on
    every rank, and memory is what sharding is for."""
    target = getattr(model, "_orig_mod", model)  # a compiled model's module
    if is_sharded(target):
        return contextlib.nullcontext()
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if now or no_sync is None else no_sync()


def init_distributed(device: str = "auto") -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, Gloo on the CPU).

    Returns True when this call started the group (the caller ends it with `end_distributed()`), False
    when there is nothing to join or the group was already up. On CUDA each process takes the GPU of its
    LOCAL_RANK.
    """
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[None]:
    """Inside the block, this process is in torchrun's process group (when WORLD_SIZE > 1); a group
    this block started is ended after it."""
    started = init_distributed(device)
    try:
        yield
    finally:
        if started:
            end_distributed()


def end_distributed() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still talks)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable Python object; the value itself in one process)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank ([value] in one process)."""
    if not is_distributed():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (queued on the device: no host sync); returns it."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def main_first(make: Callable[[], T]) -> T:
    """`make()` on rank 0, then (after a barrier) on the other ranks: for work that fills a cache the
    others then read (tokenizer training, tokenizing a corpus)."""
    if not is_distributed():
        return make()
    result = make() if is_main_process() else None
    barrier()
    return result if is_main_process() else make()  # type: ignore[return-value]
