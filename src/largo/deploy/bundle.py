"""Write and read bundles: the folder a run produces and every later stage reads.

runs/<name>/<version>/ holds config.yaml, model.safetensors, preprocessors.json, metrics.json,
report.html with its plots, and checkpoints/ while a run is unfinished. Weights are safetensors
only; nothing here unpickles.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model, save_model

from largo.config import Config, dump_config, validate_config
from largo.data.features import Processor, processor_from_state
from largo.evaluate.report import write_metrics_json, write_report
from largo.models.build import FeatureModel, build_model

WEIGHTS = "model.safetensors"
PREPROCESSORS = "preprocessors.json"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A folder that is not a complete largo bundle."""


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


def find_resumable(runs_dir: str | Path, name: str) -> Path | None:
    """The newest unfinished run of this name (it has a checkpoint but no weights yet), if any."""
    root = Path(runs_dir) / name
    for v in reversed(_versions(root)) if root.exists() else []:
        path = root / f"v{v}"
        if (path / "checkpoints" / "last.pt").exists() and not (path / WEIGHTS).exists():
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


def tokenizer_file(feature: str) -> str:
    """File name of a text input's tokenizer in the bundle: tokenizer-<input>.json."""
    return f"tokenizer-{re.sub(r'[^A-Za-z0-9_.-]', '_', feature)}.json"


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
class Bundle:
    """A bundle read from disk: config, fitted processors, metrics and the loaded model."""

    path: Path
    config: Config
    processors: dict[str, Processor]
    metrics: dict[str, Any]
    model: FeatureModel


def read_processors(path: Path, config: Config) -> dict[str, Processor]:
    """Fitted processors from preprocessors.json."""
    state = json.loads((path / PREPROCESSORS).read_text(encoding="utf-8"))
    features = state["features"]
    procs: dict[str, Processor] = {}
    for role, configs in (("input", config.inputs), ("output", config.outputs)):
        for f in configs:
            st = features[f.name]["state"]
            if "tokenizer_file" in st:
                st = {**st, "tokenizer": (path / st["tokenizer_file"]).read_text(encoding="utf-8")}
            procs[f.name] = processor_from_state(f, role == "output", st)
    return procs


def read_bundle(path: str | Path) -> Bundle:
    """Load a bundle folder (weights from safetensors, never pickle) with the model in eval mode."""
    path = Path(path)
    missing = [n for n in ("config.yaml", PREPROCESSORS, WEIGHTS) if not (path / n).exists()]
    if missing:
        hint = " (an unfinished run? resume it with --resume)" if (path / "checkpoints").exists() else ""
        raise BundleError(f"{path}: not a complete bundle, missing {', '.join(missing)}{hint}")
    config = validate_config(yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")), str(path))
    processors = read_processors(path, config)
    model = build_model(config, processors, load_pretrained=False)
    load_model(model, str(path / WEIGHTS))
    model.eval()
    metrics_path = path / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    return Bundle(path, config, processors, metrics, model)
