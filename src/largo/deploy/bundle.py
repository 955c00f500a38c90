"""Write and read bundles: the folder a run produces and every later stage reads.

runs/<name>/<version>/ holds config.yaml, model.safetensors, preprocessors.json, metrics.json,
report.html with its plots, and checkpoints/ while a run is unfinished. Weights are safetensors
only; nothing here unpickles. Reading the config and preprocessors needs no torch and lives in
`metadata.py` (re-exported here); this module adds writing bundles and loading the model.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from largo.config import Config, dump_config
from largo.data.features import Processor
from largo.deploy.metadata import (
    FORMAT_VERSION,
    PREPROCESSORS,
    WEIGHTS,
    BundleError,
    BundleInfo,
    read_bundle_info,
    read_processors,
    tokenizer_file,
)
from largo.evaluate.report import write_metrics_json, write_report
from largo.models.build import FeatureModel, build_model

__all__ = [  # the metadata names stay importable from here, where they used to live
    "FORMAT_VERSION",
    "PREPROCESSORS",
    "WEIGHTS",
    "Bundle",
    "BundleError",
    "BundleInfo",
    "environment",
    "find_resumable",
    "load_weights",
    "new_run_dir",
    "read_bundle",
    "read_processors",
    "tokenizer_file",
    "write_bundle",
    "write_run_start",
]


def _versions(run_root: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in run_root.glob("v*") if (m := re.fullmatch(r"v(\d+)", p.name)))


def new_run_dir(runs_dir: str | Path, name: str) -> Path:
    """Create and return runs_dir/name/v<N+1> (the next free version)."""
    root = Path(runs_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    while True:
        versions = _versions(root)
        path = root / f"v{(versions[-1] if versions else 0) + 1}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run took this version first
            continue


def run_folder(runs_dir: str | Path, name: str, resume: bool | str | Path) -> Path:
    """A run's folder: with `resume`, the unfinished run to continue (True: the newest of `name`, or
    the folder given); else a new version, created by rank 0 and the same on every rank under torchrun.

    Raises:
        ConfigError: when there is nothing to resume.
    """
    from largo.config import ConfigError
    from largo.train.distributed import broadcast_object, is_main_process

    if not resume:
        return broadcast_object(new_run_dir(runs_dir, name) if is_main_process() else None)
    run_dir = Path(resume) if not isinstance(resume, bool) else find_resumable(runs_dir, name)
    if run_dir is None or not (run_dir / "checkpoints" / "last.pt").exists():
        raise ConfigError(f"nothing to resume: no unfinished run of {name!r} under {runs_dir}")
    return run_dir


def find_resumable(runs_dir: str | Path, name: str) -> Path | None:
    """The newest unfinished run of this name (it has a checkpoint but no weights yet), if any."""
    root = Path(runs_dir) / name
    for v in reversed(_versions(root)) if root.exists() else []:
        path = root / f"v{v}"
        finished = (path / WEIGHTS).exists() or (path / "adapter.json").exists()  # (an LM's LoRA adapter)
        if (path / "checkpoints" / "last.pt").exists() and not finished:
            return path
    return None


def write_run_start(run_dir: Path, config: Config, processors: dict[str, Processor]) -> None:
    """Write the resolved config and the fitted preprocessors before training starts."""
    (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    roles = {f.name: "input" for f in config.inputs} | {f.name: "output" for f in config.outputs}
    features = {}
    for n, p in processors.items():
        st = p.state()
        if "tokenizer" in st:  # a standard tokenizer.json beside the weights, loadable by any HF tool
            file = tokenizer_file(n)
            (run_dir / file).write_text(st.pop("tokenizer"), encoding="utf-8")
            st["tokenizer_file"] = file
        features[n] = {"role": roles[n], "type": p.config.type, "state": st}
    state = {"format": FORMAT_VERSION, "features": features}
    (run_dir / PREPROCESSORS).write_text(json.dumps(state, indent=1, ensure_ascii=False), encoding="utf-8")


def environment() -> dict[str, str]:
    """Versions recorded in metrics.json."""
    from largo import __version__

    return {"largo": __version__, "torch": torch.__version__, "python": platform.python_version()}


def write_bundle(
    run_dir: Path, model: torch.nn.Module, metrics: dict[str, Any], predictions: Any = None
) -> Path:
    """Write weights, metrics.json and the report; returns report.html's path."""
    save_model(model, str(run_dir / WEIGHTS))
    write_metrics_json(run_dir, metrics)
    return write_report(run_dir, metrics, predictions=predictions)


@dataclass
class Bundle(BundleInfo):
    """A bundle read from disk: config, fitted processors, metrics and the loaded model."""

    model: FeatureModel


def load_weights(info: BundleInfo) -> FeatureModel:
    """Build the bundle's model and load its safetensors weights (never pickle), in eval mode."""
    model = build_model(info.config, info.processors, load_pretrained=False)
    load_model(model, str(info.path / WEIGHTS))
    return model.eval()


def read_bundle(path: str | Path) -> Bundle:
    """Load a bundle folder (weights from safetensors, never pickle) with the model in eval mode."""
    info = read_bundle_info(path)
    return Bundle(info.path, info.config, info.processors, info.metrics, load_weights(info))
