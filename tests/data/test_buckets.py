"""Dynamic padding and length buckets: batches are cut to their longest row and grouped by length."""

from __future__ import annotations

import torch

from largo.data.loader import EncodedSplit, batch_bounds, epoch_order, iter_batches
from largo.train.loop import forward_in_batches


def ragged_split(n: int = 1000, seed: int = 0) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 120, (n,), generator=g)
    ids = torch.randint(5, 50, (n, 128), generator=g, dtype=torch.int64).to(torch.int32)
    ids[torch.arange(128)[None, :] >= lengths[:, None]] = 0
    return EncodedSplit({"text": ids}, {"y": torch.arange(n)}, pad={"text": 0})


def test_lengths_are_counted_from_the_padding():
    split = ragged_split()
    assert torch.equal(split.lengths["text"], (split.inputs["text"] != 0).sum(1))


def test_bucketed_order_is_a_deterministic_permutation_with_the_same_batch_bounds():
    split = ragged_split(1000)
    a = epoch_order(1000, 3, 1, lengths=split.sort_key(), batch_size=32)
    b = epoch_order(1000, 3, 1, lengths=split.sort_key(), batch_size=32)
    assert torch.equal(a, b) and torch.equal(a.sort().values, torch.arange(1000))
    assert not torch.equal(a, epoch_order(1000, 3, 2, lengths=split.sort_key(), batch_size=32))


def test_buckets_cut_padding_and_batches_hold_only_their_longest_row():
    split = ragged_split(2000)
    bounds = batch_bounds(2000, 32)

    def padded_tokens(order: torch.Tensor) -> int:
        total = 0
        for _, inputs, _ in iter_batches(split, order, bounds):
            ids = inputs["text"]
            assert (ids != 0).sum(1).max() == ids.shape[1]  # trimmed to the batch's longest
            total += ids.numel()
        return total

    plain = padded_tokens(epoch_order(2000, 0, 0))
    bucketed = padded_tokens(epoch_order(2000, 0, 0, lengths=split.sort_key(), batch_size=32))
    real = int(split.lengths["text"].sum())
    assert bucketed < 0.75 * plain and bucketed >= real


def test_every_example_is_seen_once_per_epoch_with_buckets():
    split = ragged_split(1000)
    order = epoch_order(1000, 0, 0, lengths=split.sort_key(), batch_size=64)
    seen = torch.cat([t["y"] for _, _, t in iter_batches(split, order, batch_bounds(1000, 64))])
    assert torch.equal(seen.sort().values, torch.arange(1000))


class SumOfTokens(torch.nn.Module):
    """Depends on the real tokens only; the width of the batch must not matter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, batch):
        ids = batch["text"].float()
        return {"y": self.w * ids.sum(1, keepdim=True)}


def test_forward_in_batches_sorts_by_length_and_returns_input_order():
    split = ragged_split(300)
    out = forward_in_batches(SumOfTokens(), split.inputs, 16, pad=split.pad)["y"][:, 0]
    assert torch.allclose(out, split.inputs["text"].float().sum(1))


def test_word_dropout_replaces_only_real_tokens_at_the_rate_and_repeats_with_the_seed():
    from largo.data.augment import drop_tokens

    split = ragged_split(500)
    ids = split.inputs["text"]
    special = torch.tensor([0, 2])
    ids[:, 0] = torch.where(ids[:, 0] != 0, 2, 0)  # a [CLS]-like special token first
    out = drop_tokens(ids, 1, special, 0.2, torch.Generator().manual_seed(3))
    changed = out != ids
    assert (out[changed] == 1).all() and not changed[ids == 0].any() and not changed[ids == 2].any()
    ordinary = (ids != 0) & (ids != 2)
    assert abs(changed.sum() / ordinary.sum() - 0.2) < 0.02
    assert torch.equal(out, drop_tokens(ids, 1, special, 0.2, torch.Generator().manual_seed(3)))
