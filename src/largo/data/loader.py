"""Encoded splits and the batches the training loop reads.

A split is encoded once into tensors (`EncodedSplit`); a batch is a gather with an index tensor, so
there is no per-sample Python work, no collate, and no worker processes to start. The order of an
epoch is a pure function of (seed, epoch), which is what lets a killed run resume mid-epoch without
replaying or skipping a batch.

Sequences (token ids) are stored right-padded to the split's longest row and trimmed per batch to
the batch's longest row (dynamic padding). With `length_buckets`, an epoch's shuffled order is cut
into pools of 50 batches and sorted by length inside each pool, then the batches are shuffled: similar
lengths share a batch, so little compute goes into padding, while every batch still comes from a
random part of the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from largo.data.text import text_lengths

Batch = dict[str, torch.Tensor]


@dataclass
class EncodedSplit:
    """One split as tensors: model inputs and targets, first dimension = examples."""

    inputs: Batch
    targets: Batch
    pad: dict[str, int] = field(default_factory=dict)  # sequence input key → padding id
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)  # key → tokens per row (CPU)

    def __post_init__(self) -> None:
        for k, pad_id in self.pad.items():
            if k not in self.lengths:
                self.lengths[k] = text_lengths(self.inputs[k], pad_id).cpu()

    def __len__(self) -> int:
        first = next(iter(self.inputs.values()))
        return int(first.shape[0])

    def to(self, device: torch.device | str) -> EncodedSplit:
        """The same split on another device (lengths stay on the CPU)."""
        return EncodedSplit(
            {k: v.to(device) for k, v in self.inputs.items()},
            {k: v.to(device) for k, v in self.targets.items()},
            self.pad,
            self.lengths,
        )

    def longest(self, index: torch.Tensor) -> dict[str, int]:
        """Longest row of each sequence input among the examples at `index` (a CPU index tensor)."""
        return {
            k: max(1, int(lengths[index].max())) if len(index) else 1 for k, lengths in self.lengths.items()
        }

    def take(self, index: torch.Tensor, longest: dict[str, int] | None = None) -> tuple[Batch, Batch]:
        """Gather the examples at `index` (on the split's device); sequences are cut to `longest`."""
        longest = longest or {}
        inputs = {k: (v[:, : longest[k]] if k in longest else v)[index] for k, v in self.inputs.items()}
        return inputs, {k: v[index] for k, v in self.targets.items()}

    def sort_key(self) -> torch.Tensor | None:
        """Per-example length used for bucketing: the longest of its sequence inputs (None: no text)."""
        if not self.lengths:
            return None
        return torch.stack(list(self.lengths.values())).amax(dim=0)


def epoch_order(
    n: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    lengths: torch.Tensor | None = None,
    batch_size: int = 1,
    pool_batches: int = 50,
) -> torch.Tensor:
    """The example order of one epoch: a permutation that depends only on (seed, epoch).

    With `lengths`, examples of similar length are grouped into the same batches (see the module
    docstring); full batches are shuffled and a last partial batch stays last, so batch boundaries
    are the same as without bucketing.
    """
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    if lengths is None or batch_size <= 1:
        return order
    pool = batch_size * pool_batches
    pools = [p[torch.argsort(lengths[p], stable=True)] for p in order.split(pool)]
    order = torch.cat(pools)
    full = n // batch_size
    batches = order[: full * batch_size].view(full, batch_size)[torch.randperm(full, generator=g)]
    return torch.cat([batches.reshape(-1), order[full * batch_size :]])


def batch_bounds(n: int, batch_size: int, drop_singleton: bool = False) -> list[tuple[int, int]]:
    """[start, end) of each batch; a last batch of one example is dropped when asked (BatchNorm)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if drop_singleton and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds.pop()
    return bounds


def take_batch(
    split: EncodedSplit,
    order: torch.Tensor,
    bounds: list[tuple[int, int]],
    i: int,
    transform: Callable[[Batch, int], Batch] | None = None,
    on_device: torch.Tensor | None = None,
) -> tuple[Batch, Batch]:
    """(inputs, targets) of batch `i` of an epoch in `order`, padded to its longest text.

    `transform(inputs, i)` runs on the batch (augmentation); it gets the batch index so its randomness
    can be derived from it rather than from hidden state. `on_device` is `order` already on the split's
    device (pass it when taking many batches of one order).
    """
    if on_device is None:
        on_device = order.to(next(iter(split.inputs.values())).device)
    lo, hi = bounds[i]
    inputs, targets = split.take(on_device[lo:hi], split.longest(order[lo:hi]))
    if transform is not None:
        inputs = transform(inputs, i)
    return inputs, targets


def iter_batches(
    split: EncodedSplit,
    order: torch.Tensor,
    bounds: list[tuple[int, int]],
    start: int = 0,
    transform: Callable[[Batch, int], Batch] | None = None,
) -> Iterator[tuple[int, Batch, Batch]]:
    """Yield (batch index, inputs, targets) from batch `start` on, in `order` (see `take_batch`)."""
    on_device = order.to(next(iter(split.inputs.values())).device)
    for i in range(start, len(bounds)):
        yield i, *take_batch(split, order, bounds, i, transform, on_device)
