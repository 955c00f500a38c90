"""Encoded splits and the batches the training loop reads.

A split is encoded once into tensors (`EncodedSplit`); a batch is a gather with an index tensor, so
there is no per-sample Python work, no collate, and no worker processes to start. The order of an
epoch is a pure function of (seed, epoch), which is what lets a killed run resume mid-epoch without
replaying or skipping a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

Batch = dict[str, torch.Tensor]


@dataclass
class EncodedSplit:
    """One split as tensors: model inputs and targets, first dimension = examples."""

    inputs: Batch
    targets: Batch

    def __len__(self) -> int:
        first = next(iter(self.inputs.values()))
        return int(first.shape[0])

    def to(self, device: torch.device | str) -> EncodedSplit:
        """The same split on another device."""
        return EncodedSplit(
            {k: v.to(device) for k, v in self.inputs.items()},
            {k: v.to(device) for k, v in self.targets.items()},
        )

    def take(self, index: torch.Tensor) -> tuple[Batch, Batch]:
        """Gather the examples at `index` (a 1-d int64 tensor on the split's device)."""
        return ({k: v[index] for k, v in self.inputs.items()}, {k: v[index] for k, v in self.targets.items()})


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_bounds(n: int, batch_size: int, drop_singleton: bool = False) -> list[tuple[int, int]]:
    """[start, end) of each batch; a last batch of one example is dropped when asked (BatchNorm)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if drop_singleton and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds.pop()
    return bounds


def iter_batches(
    split: EncodedSplit,
    order: torch.Tensor,
    bounds: list[tuple[int, int]],
    start: int = 0,
    transform: Callable[[Batch, int], Batch] | None = None,
) -> Iterator[tuple[int, Batch, Batch]]:
    """Yield (batch index, inputs, targets) from batch `start` on, in `order`.

    `transform(inputs, batch_index)` runs on each batch (augmentation); it gets the batch index so
    its randomness can be derived from it rather than from hidden state.
    """
    order = order.to(next(iter(split.inputs.values())).device)
    for i in range(start, len(bounds)):
        lo, hi = bounds[i]
        inputs, targets = split.take(order[lo:hi])
        if transform is not None:
            inputs = transform(inputs, i)
        yield i, inputs, targets
