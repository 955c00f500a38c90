"""What the command-line modules share: the lazily imported API and the error handling of every verb."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import typer

from largo.config import ConfigError
from largo.data.readers import DataError
from largo.deploy.metadata import BundleError


class LazyApi:
    """`largo.api`, imported on first use: it imports torch, which a command serving an ONNX model
    from a torch-free image must not need just to start."""

    def __getattr__(self, name: str) -> Any:
        from largo import api as module

        return getattr(module, name)


api = LazyApi()


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print known errors as one clear message and exit 2, without a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, BundleError, ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper
