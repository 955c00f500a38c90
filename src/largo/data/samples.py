"""Sample data written from scikit-learn's bundled copies (no download), for the quickstart and tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_folder(folder: str | Path) -> Path:
    """Write scikit-learn's 1,797 8×8 digits as PNGs under folder/<digit>/<index>.png.

    Pixel values 0..16 are scaled to 0..255. A folder that already holds all 1,797 images is reused.
    """
    from sklearn.datasets import load_digits

    folder = Path(folder)
    if folder.exists() and sum(1 for _ in folder.rglob("*.png")) == 1797:
        return folder
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        path = folder / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8), mode="L").save(path)
    return folder
