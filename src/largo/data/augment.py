"""Augmentation for the train split: images (random flip, shift, rotation) and texts (word dropout).

All three are one random affine transform per image applied with a single `grid_sample` over the
batch, so augmentation costs one kernel per batch rather than a Python loop over images. Randomness
comes from an explicit generator, so a resumed run draws exactly the same transforms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from largo.config import AugmentConfig


def is_active(config: AugmentConfig) -> bool:
    """Whether the config asks for any augmentation."""
    return config.flip or config.crop > 0 or config.rotate > 0


def augment_images(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly transform a batch of images.

    Args:
        x: images [b, c, h, w], uint8 or float in pixel units.
        config: which transforms and how strong.
        generator: a CPU generator; the same state gives the same transforms.

    Returns:
        float32 images [b, c, h, w] in pixel units, on x's device.
    """
    b, _, h, w = x.shape
    rand = torch.rand(b, 4, generator=generator)  # angle, shift x, shift y, flip
    angle = (rand[:, 0] * 2 - 1) * math.radians(config.rotate)
    # shifts of up to `crop` pixels, in the [-1, 1] coordinates of affine_grid, whole pixels only
    dx = torch.round((rand[:, 1] * 2 - 1) * config.crop) * 2 / w
    dy = torch.round((rand[:, 2] * 2 - 1) * config.crop) * 2 / h
    flip = torch.where((rand[:, 3] < 0.5) & torch.tensor(config.flip), -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, dx], 1), torch.stack([sin * flip, cos, dy], 1)], 1
    ).to(x.device)  # [b, 2, 3]
    xf = x.float()
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def drop_tokens(
    ids: torch.Tensor, unk_id: int, special: torch.Tensor, rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Word dropout: replace a random `rate` of the ordinary tokens with [UNK] (Iyyer et al., 2015).

    It regularizes, and it trains the [UNK] embedding, which a vocabulary fit on the same texts
    otherwise rarely sees, so unknown words at predict time land on a learned vector. Special tokens
    (`special`: padding, [CLS], [SEP] …) are never replaced.
    """
    drop = torch.rand(ids.shape, generator=generator).to(ids.device) < rate
    keep = torch.isin(ids, special.to(ids.device))
    return torch.where(drop & ~keep, torch.full_like(ids, unk_id), ids)
