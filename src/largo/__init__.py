"""largo: build, train, evaluate, deploy and update deep-learning models end to end.

import largo
result = largo.train("examples/digits.yaml")
predictor = largo.load(result.path)
predictor.predict([{"image": "digit.png"}])

The names below load on first use (PEP 562), so `import largo.deploy.server` for an ONNX-only
serving image does not pull in torch through this package's __init__.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → the module that defines it
_EXPORTS = {
    "TrainResult": "largo.api",
    "evaluate": "largo.api",
    "infer_config": "largo.api",
    "info": "largo.api",
    "load": "largo.api",
    "predict": "largo.api",
    "train": "largo.api",
    "pretrain": "largo.api",
    "generate": "largo.api",
    "import_lm": "largo.api",
    "tune": "largo.api",
    "translate": "largo.api",
    "TextGenerator": "largo.deploy.generator",
    "Translator": "largo.deploy.translator",
    "Seq2SeqConfig": "largo.config_seq2seq",
    "LMConfig": "largo.config_lm",
    "export": "largo.api",
    "compress": "largo.api",
    "serve": "largo.api",
    "Config": "largo.config",
    "ConfigError": "largo.config",
    "load_config": "largo.config",
    "validate_config": "largo.config",
    "DataError": "largo.data.readers",
    "BundleError": "largo.deploy.bundle",
    "Predictor": "largo.deploy.predictor",
}

__all__ = [  # the names of _EXPORTS (a test keeps the two equal) and the version
    "BundleError",
    "Config",
    "ConfigError",
    "DataError",
    "LMConfig",
    "Predictor",
    "Seq2SeqConfig",
    "TextGenerator",
    "TrainResult",
    "Translator",
    "__version__",
    "compress",
    "evaluate",
    "export",
    "generate",
    "import_lm",
    "infer_config",
    "info",
    "load",
    "load_config",
    "predict",
    "pretrain",
    "serve",
    "train",
    "translate",
    "tune",
    "validate_config",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from largo.api import (
        TrainResult,
        compress,
        evaluate,
        export,
        generate,
        import_lm,
        infer_config,
        info,
        load,
        predict,
        pretrain,
        serve,
        train,
        translate,
        tune,
    )
    from largo.config import Config, ConfigError, load_config, validate_config
    from largo.config_lm import LMConfig
    from largo.config_seq2seq import Seq2SeqConfig
    from largo.data.readers import DataError
    from largo.deploy.bundle import BundleError
    from largo.deploy.generator import TextGenerator
    from largo.deploy.predictor import Predictor
    from largo.deploy.translator import Translator


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'largo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """`largo.train` and `largo.evaluate` are functions of the API and also subpackages. Importing a
    subpackage sets it as an attribute of its parent; here the API function keeps the name instead
    (the subpackage stays reachable as `import largo.train.loop` / `sys.modules`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) not in (None, value.__name__):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
