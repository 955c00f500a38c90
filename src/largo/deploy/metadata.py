"""Read a bundle's config, fitted preprocessors and JSON records without torch.

What an ONNX Runtime serving image needs from a bundle: `bundle.py` adds the torch side (writing
bundles, loading the weights into a model) on top of this module, which imports neither torch nor
the model code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from largo.config import Config, validate_config
from largo.data.features import Processor, processor_from_state

WEIGHTS = "model.safetensors"
PREPROCESSORS = "preprocessors.json"
ADAPTER_RECORD = "adapter.json"  # an adapter-only LoRA bundle: the base bundle it applies to
EXPORT_RECORD = "export.json"  # what `largo export` wrote, its parity checks and runtime timings
FORMAT_VERSION = 1
TASK_NAMES = {"lm": "language-model", "seq2seq": "seq2seq"}  # bundles without input/output features


class BundleError(ValueError):
    """A folder that is not a complete largo bundle."""


class ParityError(Exception):
    """An exported or compressed model whose outputs do not match the eager model closely enough."""


def tokenizer_file(feature: str) -> str:
    """File name of a text input's tokenizer in the bundle: tokenizer-<input>.json."""
    return f"tokenizer-{re.sub(r'[^A-Za-z0-9_.-]', '_', feature)}.json"


def check_files(path: Path, names: tuple[str, ...]) -> None:
    """Raise BundleError naming the files of `names` the folder lacks."""
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    missing = [n for n in names if not (path / n).exists()]
    if missing:
        hint = " (an unfinished run? resume it with --resume)" if (path / "checkpoints").exists() else ""
        raise BundleError(
            f"{path}: not a complete bundle, missing {', '.join(missing)}{hint or hf_hint(path)}"
        )


def hf_hint(path: str | Path) -> str:
    """What to do with a Hugging Face model folder given where a bundle belongs ("" for other folders)."""
    folder = Path(path)
    if (folder / "config.json").is_file() and not (folder / "config.yaml").is_file():
        return f" (a Hugging Face model folder; a causal LM becomes a bundle: largo import {path} --out DIR)"
    return ""


def bundle_task(path: str | Path) -> str | None:
    """The `task` of a folder's config.yaml, read without torch: "lm", "seq2seq", or None (a model of
    input and output features, or no config)."""
    file = Path(path) / "config.yaml"
    if not file.is_file():
        return None
    data = yaml.safe_load(file.read_text(encoding="utf-8"))
    task = data.get("task") if isinstance(data, dict) else None
    return task if isinstance(task, str) else None


def is_lm_bundle(path: str | Path) -> bool:
    """Whether a folder's config.yaml is a language model's (`task: lm`), read without torch."""
    return bundle_task(path) == "lm"


def is_seq2seq_bundle(path: str | Path) -> bool:
    """Whether a folder's config.yaml is a sequence-to-sequence model's (`task: seq2seq`)."""
    return bundle_task(path) == "seq2seq"


def read_task_config(path: str | Path, task: str, validate: Any) -> Any:
    """A bundle's config.yaml validated by `validate`, when its `task` is `task` (else BundleError)."""
    path = Path(path)
    check_files(path, ("config.yaml",))
    data = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("task") != task:
        raise BundleError(f"{path}: not a {TASK_NAMES[task]} bundle (config.yaml has no 'task: {task}')")
    return validate(data, str(path / "config.yaml"))


def read_config(path: Path) -> Config:
    """The bundle's resolved config.yaml."""
    return validate_config(yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")), str(path))


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


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the bundle as a dict; {} when it does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


@dataclass
class BundleInfo:
    """A bundle without its model: config, fitted processors and metrics (what serving reads)."""

    path: Path
    config: Config
    processors: dict[str, Processor]
    metrics: dict[str, Any]


def read_bundle_info(path: str | Path, required: tuple[str, ...] = (WEIGHTS,)) -> BundleInfo:
    """Config, processors and metrics of a bundle; `required` names the model files it must hold."""
    path = Path(path)
    task = bundle_task(path)
    if task in TASK_NAMES:  # a bundle of another shape: say so rather than name a missing file
        raise BundleError(
            f"{path}: a {TASK_NAMES[task]} bundle (task: {task}); this works on models of input and output "
            "features (a config with inputs: and outputs:)"
        )
    check_files(path, ("config.yaml", PREPROCESSORS, *required))
    config = read_config(path)
    return BundleInfo(path, config, read_processors(path, config), read_json(path / "metrics.json"))
