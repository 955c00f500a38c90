"""largo: build, train, evaluate, deploy and update deep-learning models end to end.

import largo
result = largo.train("examples/digits.yaml")
predictor = largo.load(result.path)
predictor.predict([{"image": "digit.png"}])
"""

__version__ = "0.1.0"

from largo.api import TrainResult, evaluate, infer_config, info, load, predict, train  # noqa: E402
from largo.config import Config, ConfigError, load_config, validate_config  # noqa: E402
from largo.data.readers import DataError  # noqa: E402
from largo.deploy.bundle import BundleError  # noqa: E402
from largo.deploy.predictor import Predictor  # noqa: E402

__all__ = [
    "BundleError",
    "Config",
    "ConfigError",
    "DataError",
    "Predictor",
    "TrainResult",
    "__version__",
    "evaluate",
    "infer_config",
    "info",
    "load",
    "load_config",
    "predict",
    "train",
    "validate_config",
]
