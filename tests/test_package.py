"""The package namespace: every public name resolves, lazily, and importing largo needs no torch."""

from __future__ import annotations

import subprocess
import sys

import largo


def test_all_names_resolve_and_match_the_lazy_table():
    assert set(largo.__all__) == {*largo._EXPORTS, "__version__"}
    for name in largo.__all__:
        assert getattr(largo, name) is not None, name
    # train / evaluate are also subpackages: the API functions keep the names once those are imported
    from largo.evaluate import metrics  # noqa: F401
    from largo.train import loop  # noqa: F401

    assert callable(largo.train) and largo.train.__module__ == "largo.api"
    assert callable(largo.evaluate) and largo.evaluate.__module__ == "largo.api"


def test_importing_largo_and_its_cli_needs_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import largo, largo.cli, largo.config, largo.deploy.predictor, largo.deploy.server\n"
        "print(largo.ConfigError.__name__, largo.__version__)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["ConfigError", largo.__version__]
