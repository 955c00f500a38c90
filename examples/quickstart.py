"""Quickstart: train a CNN on scikit-learn's bundled handwritten digits, then predict from the bundle.

Writes the 1,797 real 8×8 digits as an image folder (one sub-folder per class), trains with largo's
default config for an image folder (exactly what `largo train data/digits` does), prints the test
accuracy and where the bundle and report are, and predicts a few held-out digits from the reloaded bundle.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from largo.data.samples import write_digits_folder


def main() -> int:
    import largo

    data = write_digits_folder(Path("runs/data/digits"))
    print(f"digits written to {data}/ (one folder per class)")
    # the CLI with no config: infers an image input and a category target, trains the default CNN
    cmd = [sys.executable, "-m", "largo.cli", "train", str(data), "--name", "digits"]
    print("$ largo train", data, "--name digits")
    if subprocess.call(cmd) != 0:
        return 1
    bundle = max(Path("runs/digits").glob("v*"), key=lambda p: int(p.name[1:]))
    predictor = largo.load(bundle)
    acc = predictor.bundle.metrics["test"]["label"]["accuracy"]
    print(f"\ntest accuracy: {acc:.4f}")
    print(f"bundle: {bundle}\nreport: {bundle / 'report.html'}")
    files = sorted(data.rglob("*.png"))
    random.Random(0).shuffle(files)
    print("\npredictions from the reloaded bundle:")
    for path in files[:5]:
        r = predictor.predict({"image": str(path)})
        print(f"  {path}: true {path.parent.name}  predicted {r['label']}  (p={r['label_probability']:.3f})")
    return 0 if acc >= 0.98 else 1


if __name__ == "__main__":
    sys.exit(main())
