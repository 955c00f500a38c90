"""Tests for largo.data.loader (epoch order, batch bounds, resumable iteration) and largo.data.augment."""

from __future__ import annotations

import pytest
import torch

from largo.config import AugmentConfig
from largo.data.augment import augment_images, is_active
from largo.data.loader import EncodedSplit, batch_bounds, epoch_order, iter_batches

# ------------------------------------------------------------------------------------------- loader


def test_epoch_order_is_a_deterministic_permutation():
    order = epoch_order(100, seed=3, epoch=0)
    assert order.dtype == torch.int64
    assert torch.equal(order.sort().values, torch.arange(100))
    assert not torch.equal(order, torch.arange(100))  # actually shuffled
    assert torch.equal(order, epoch_order(100, seed=3, epoch=0))
    torch.manual_seed(123)  # the global RNG state must not matter
    assert torch.equal(order, epoch_order(100, seed=3, epoch=0))
    assert not torch.equal(order, epoch_order(100, seed=3, epoch=1))
    assert not torch.equal(order, epoch_order(100, seed=4, epoch=0))
    assert torch.equal(epoch_order(7, seed=3, epoch=2, shuffle=False), torch.arange(7))


def test_batch_bounds_cover_every_example_once():
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(8, 4) == [(0, 4), (4, 8)]
    assert batch_bounds(0, 4) == []


def test_batch_bounds_drop_singleton_only_when_asked():
    assert batch_bounds(9, 4) == [(0, 4), (4, 8), (8, 9)]
    assert batch_bounds(9, 4, drop_singleton=True) == [(0, 4), (4, 8)]
    assert batch_bounds(10, 4, drop_singleton=True) == [(0, 4), (4, 8), (8, 10)]  # a pair is kept
    assert batch_bounds(1, 4, drop_singleton=True) == [(0, 1)]  # never drop the only batch


def _split(n: int) -> EncodedSplit:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1) * torch.tensor([1.0, -1.0])
    return EncodedSplit({"x": x, "ids": torch.arange(n)}, {"y": torch.arange(n) * 10})


def test_iter_batches_follow_the_order():
    split = _split(11)
    assert len(split) == 11
    order = epoch_order(11, seed=0, epoch=5)
    bounds = batch_bounds(11, 3)
    seen = []
    for i, inputs, targets in iter_batches(split, order, bounds):
        lo, hi = bounds[i]
        assert torch.equal(inputs["ids"], order[lo:hi])
        assert torch.equal(targets["y"], order[lo:hi] * 10)
        assert torch.equal(inputs["x"][:, 1], -order[lo:hi].float())
        seen.append(inputs["ids"])
    assert torch.equal(torch.cat(seen), order)


def test_iter_batches_from_start_yields_exactly_the_rest():
    split = _split(23)
    order = epoch_order(23, seed=1, epoch=0)
    bounds = batch_bounds(23, 4)
    full = list(iter_batches(split, order, bounds))
    rest = list(iter_batches(split, order, bounds, start=3))
    assert [i for i, _, _ in rest] == [3, 4, 5]
    assert len(rest) == len(full) - 3
    for (i, a, ya), (j, b, yb) in zip(full[3:], rest, strict=True):
        assert i == j
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(ya["y"], yb["y"])


def test_iter_batches_passes_the_batch_index_to_transform():
    split = _split(10)
    calls = []

    def transform(inputs, i):
        calls.append(i)
        return {**inputs, "x": inputs["x"] + 1000 * i}

    bounds = batch_bounds(10, 4)
    out = list(iter_batches(split, torch.arange(10), bounds, start=1, transform=transform))
    assert calls == [1, 2]
    assert out[0][1]["x"][:, 0].tolist() == [1004.0, 1005.0, 1006.0, 1007.0]
    assert out[1][1]["x"][:, 0].tolist() == [2008.0, 2009.0]


def test_encoded_split_take_and_to():
    split = _split(5).to("cpu")
    inputs, targets = split.take(torch.tensor([4, 0]))
    assert inputs["ids"].tolist() == [4, 0] and targets["y"].tolist() == [40, 0]


# ------------------------------------------------------------------------------------------ augment


def _images(b: int = 16, c: int = 2, h: int = 10, w: int = 12) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8)


def _shifted(x: torch.Tensor, sx: int, sy: int) -> torch.Tensor:
    """out[..., i, j] = x[..., i + sy, j + sx], zero outside (the content moves by (-sx, -sy))."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, xs = slice(max(0, -sy), min(h, h - sy)), slice(max(0, -sx), min(w, w - sx))
    ys_src, xs_src = slice(max(0, sy), min(h, h + sy)), slice(max(0, sx), min(w, w + sx))
    out[..., ys, xs] = x[..., ys_src, xs_src]
    return out


def test_off_config_is_identity():
    x = _images()
    cfg = AugmentConfig()
    assert not is_active(cfg)
    out = augment_images(x, cfg, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == x.shape
    # identity within 1e-4 on the [0, 1] scale (float32 grid maths), and exact after rounding
    assert torch.allclose(out / 255, x.float() / 255, rtol=0, atol=1e-4)
    assert torch.equal(out.round(), x.float())
    # flip off, no shift, no rotation: identity on float input as well
    xf = torch.rand(3, 1, 5, 7) * 255
    assert torch.allclose(
        augment_images(xf, cfg, torch.Generator().manual_seed(1)) / 255, xf / 255, rtol=0, atol=1e-4
    )


def test_crop_shifts_content_by_whole_pixels():
    x = _images(b=32).float()
    cfg = AugmentConfig(crop=2)
    assert is_active(cfg)
    out = augment_images(x, cfg, torch.Generator().manual_seed(0))
    shifts = []
    for k in range(len(x)):
        match = [
            (sx, sy)
            for sx in range(-2, 3)
            for sy in range(-2, 3)
            if torch.allclose(out[k], _shifted(x[k], sx, sy), atol=1e-3)
        ]
        assert len(match) == 1, f"image {k} is not a whole-pixel shift of its input"
        shifts.append(match[0])
    assert any(s != (0, 0) for s in shifts)
    assert len(set(shifts)) > 3  # offsets vary across the batch


def test_flip_mirrors_horizontally():
    x = _images(b=32).float()
    out = augment_images(x, AugmentConfig(flip=True), torch.Generator().manual_seed(0))
    flipped = 0
    for k in range(len(x)):
        same = torch.allclose(out[k], x[k], atol=1e-3)
        mirrored = torch.allclose(out[k], x[k].flip(-1), atol=1e-3)
        assert same != mirrored
        flipped += mirrored
    assert 0 < flipped < len(x)


def test_rotation_moves_pixels_but_keeps_the_centre():
    x = torch.zeros(8, 1, 9, 9)
    x[:, :, 4, 4] = 200.0  # a dot at the exact centre stays there under any rotation
    x[:, :, 4, 8] = 100.0
    out = augment_images(x, AugmentConfig(rotate=90.0), torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, :, 4, 4], x[:, :, 4, 4], atol=1e-3)
    assert not torch.allclose(out, x, atol=1.0)


def test_same_generator_seed_same_output():
    x = _images()
    cfg = AugmentConfig(flip=True, crop=3, rotate=15.0)
    a = augment_images(x, cfg, torch.Generator().manual_seed(7))
    b = augment_images(x, cfg, torch.Generator().manual_seed(7))
    c = augment_images(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == x.shape and a.dtype == torch.float32 and a.device == x.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda_matches_cpu():
    x = _images()
    cfg = AugmentConfig(flip=True, crop=2, rotate=10.0)
    cpu = augment_images(x, cfg, torch.Generator().manual_seed(3))
    gpu = augment_images(x.cuda(), cfg, torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-2)
