"""Shared fixtures: small real data sets written from scikit-learn's bundled copies (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

from largo.data.samples import write_digits_folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not crawl when other processes share the cores).

    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored after.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's 1,797 8×8 digits as an image folder: <root>/<digit>/<index>.png."""
    return write_digits_folder(tmp_path_factory.mktemp("digits") / "images")


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits as a table: 64 pixel columns p0..p63 and a label column."""
    from sklearn.datasets import load_digits

    d = load_digits()
    cols = {f"p{i}": d.data[:, i] for i in range(64)}
    cols["label"] = d.target
    path = tmp_path_factory.mktemp("digits_csv") / "digits.csv"
    pacsv.write_csv(pa.table(cols), path)
    return path


@pytest.fixture(scope="session")
def diabetes_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's diabetes regression table (442 rows, 10 numbers, target 'progression')."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    cols = {name: d.data[:, i] for i, name in enumerate(d.feature_names)}
    cols["progression"] = d.target
    path = tmp_path_factory.mktemp("diabetes") / "diabetes.csv"
    pacsv.write_csv(pa.table(cols), path)
    return path
