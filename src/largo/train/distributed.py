"""Process and device helpers: which device to train on, and rank-aware printing.

Under torchrun every process sees RANK/WORLD_SIZE; only rank 0 prints. Multi-process training (DDP)
builds on these helpers; a single process is rank 0 of a world of one.
"""

from __future__ import annotations

import os
import sys

import torch


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
