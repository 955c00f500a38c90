"""Magnitude pruning: zero the smallest weights of the model and write the result as a new bundle.

`torch.nn.utils.prune.global_unstructured` with L1 magnitude masks the given fraction of all weight
matrices together (Linear, Conv, Embedding, RNN input/hidden matrices; biases and norms are kept): the
smallest |w| anywhere go first, which keeps accuracy better than cutting every layer by the same share
(a 10-class head loses little where a wide first layer has many near-zero weights). `prune.remove`
makes the zeros permanent, and the pruned weights are written as safetensors into the next version of the run
(runs/<name>/v<N+1>/, with the source's config, preprocessors and tokenizers), so everything
downstream (evaluate, export, serve) reads it like any other bundle. `compress.json` in the new
version records the source, the fraction and the accuracy check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn
from torch.nn.utils import prune

from largo.deploy.bundle import WEIGHTS, Bundle, new_run_dir, read_bundle
from largo.deploy.export import HeldOut, ParityError, outputs_of, parity
from largo.deploy.predictor import Predictor

COMPRESS_RECORD = "compress.json"
_SKIP = {WEIGHTS, "checkpoints", "evaluations", "export.json", "model.onnx", "model.int8.onnx", "model.ts"}


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight matrix the pruning applies to."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.RNNBase)
    out = []
    for module in model.modules():
        if isinstance(module, kinds):
            out += [(module, n) for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    return out


def prune_model(model: nn.Module, amount: float) -> float:
    """Zero the `amount` share of smallest-magnitude weights (over all weight matrices) in place;
    returns the zero fraction over those matrices."""
    if not 0.0 < amount < 1.0:
        raise ValueError(f"--prune must be between 0 and 1 (exclusive), got {amount}")
    targets = prunable(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in targets:
        prune.remove(module, name)
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()  # the cuDNN weight buffer now points at the new tensors
    return zero_fraction(model)


def zero_fraction(model: nn.Module) -> float:
    """Share of exact zeros among the prunable weight matrices."""
    params = [getattr(m, n) for m, n in prunable(model)]
    return sum(int((p == 0).sum()) for p in params) / max(1, sum(p.numel() for p in params))


def compress_bundle(bundle_path: str | Path, rows: HeldOut, amount: float) -> tuple[Path, dict[str, Any]]:
    """Prune a bundle's weights into the run's next version; check accuracy on the held-out rows.

    Returns (new bundle path, record). Raises ParityError (after writing the bundle and its record)
    when accuracy drops by more than a point.
    """
    source: Bundle = read_bundle(bundle_path)
    reference = outputs_of(Predictor(source), rows)
    pruned = read_bundle(bundle_path)  # a second copy to prune; the source stays as it was
    fraction = prune_model(pruned.model, amount)
    check = parity(source, reference, outputs_of(Predictor(pruned), rows), rows, lossy=True)
    run_root = Path(bundle_path).parent  # runs/<name>: the pruned weights become its next version
    target = new_run_dir(run_root.parent, run_root.name)
    for item in Path(bundle_path).iterdir():
        if item.name in _SKIP:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, target / item.name)
    save_model(pruned.model, str(target / WEIGHTS))
    record = {
        "source": str(Path(bundle_path)),
        "method": "global L1 unstructured over all weight matrices, made permanent with prune.remove",
        "prune": amount,
        "zero_fraction": fraction,
        "data": rows.source,
        "parity": check,
    }
    (target / COMPRESS_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
    if not check["passed"]:
        raise ParityError(f"pruned bundle {target} lost more than 1 accuracy point; see {COMPRESS_RECORD}")
    return target, record
