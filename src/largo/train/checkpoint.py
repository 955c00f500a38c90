"""Atomic checkpoints for resume: model, optimizer, schedule, RNG states and the data position.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
`last.pt`, so a run killed at any instant leaves either the old or the new checkpoint, never half of
one. Loading uses `torch.load(weights_only=True)`: tensors and plain containers only, no arbitrary
unpickling.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from largo.train.distributed import barrier, gather_objects, group_rank_and_size, is_main_process

CHECKPOINT_NAME = "last.pt"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state the training loop touches, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_states_of_all_ranks() -> list[dict[str, Any]]:
    """`rng_state()` of every rank, in rank order ([this process's] without a process group). Sent as
    torch.save bytes and read back weights_only: tensors do not travel through the object collectives
    intact."""
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in gather_objects(buf.getvalue())]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore(ckpt: dict[str, Any], **stateful: Any) -> None:
    """Load each object's state from the checkpoint entry of its name (model=…, optimizer=…, …) and
    restore the RNG states (under DDP this rank's, when the checkpoint holds every rank's); None
    objects are skipped."""
    for name, obj in stateful.items():
        if obj is not None:
            obj.load_state_dict(ckpt[name])
    me, world = group_rank_and_size()
    by_rank = ckpt.get("rng_by_rank") or []
    set_rng_state(by_rank[me] if world > 1 and len(by_rank) == world else ckpt["rng"])


def full_state_dict(model: Any, optimizer: Any = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A sharded (FSDP2) model's, and its optimizer's, whole state dicts: a collective every rank calls;
    rank 0 gets them on the CPU (the other ranks get empty dicts). Optimizer state is keyed by
    parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, optimizer, options=options)


def restore_sharded(ckpt: dict[str, Any], model: Any, optimizer: Any, **stateful: Any) -> None:
    """`restore` for a sharded model: the checkpoint's whole model and optimizer state (written by a
    sharded run) are sharded onto this rank; the other objects and the RNG as `restore` does."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )  # fmt: skip
    restore(ckpt, **stateful)


def save_checkpoint_from_rank0(directory: str | Path, progress: dict[str, Any], **stateful: Any) -> None:
    """What every rank calls to checkpoint, the counterpart of `restore`: the ranks' RNG states are
    gathered, rank 0 writes `progress` and each object's `state_dict()` under its name (model=…,
    optimizer=…; a dict is a state dict made already, e.g. gathered from shards; None objects are
    skipped) with them, and all wait until the file is on disk (a rank
    may resume from it next)."""
    rngs = _rng_states_of_all_ranks()  # a collective: every rank takes part
    if is_main_process():
        states = {
            name: obj if isinstance(obj, dict) else obj.state_dict()
            for name, obj in stateful.items()
            if obj is not None
        }
        save_checkpoint(directory, {**progress, **states, "rng": rngs[0], "rng_by_rank": rngs})
    barrier()


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` to directory/last.pt and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".last-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The state in directory/last.pt, or None when there is none."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    # memory-mapped: under torchrun every rank reads the same file, whose pages the OS then holds once
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
