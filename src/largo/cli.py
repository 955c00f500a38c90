"""The command line: `largo train|evaluate|predict|info`. Each verb calls the API function of its name."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from largo import api
from largo.config import ConfigError, apply_overrides, dump_config, load_config, validate_config
from largo.data.readers import DataError
from largo.deploy.bundle import BundleError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="largo: data → model → bundle → predictions."
)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print known errors as one clear message and exit 2, without a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, BundleError, ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_friendly
def train(
    source: Annotated[str, typer.Argument(help="A config.yaml, or a data file / image folder to train on.")],
    target: Annotated[
        list[str] | None, typer.Option("--target", "-t", help="Column to predict (data file).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name (runs/<name>/<version>).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    runs_dir: Annotated[str | None, typer.Option("--runs-dir", help="Override runs_dir.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override any key: --set train.batch_size=32")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the newest unfinished run of this name.")
    ] = False,
    resume_from: Annotated[
        str | None, typer.Option("--resume-from", help="Continue this run folder.")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train a model and write a bundle. With a data file and --target, the config is inferred."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        data = load_config(path).model_dump(mode="json")
    else:
        if not target:
            if path.is_dir():
                target = ["label"]  # an image folder's class column
            else:
                raise ConfigError("a data file needs --target COLUMN (or pass a config.yaml)")
        cfg, inferred = api.infer_config(path, target, name)
        for column, why in inferred.skipped.items():
            typer.echo(f"note: column {column!r} not used: {why}", err=True)
        data = cfg.model_dump(mode="json")
    if name:
        data["name"] = name
    if epochs:
        data.setdefault("train", {})["epochs"] = epochs
    if runs_dir:
        data["runs_dir"] = runs_dir
    data.setdefault("train", {})["progress"] = progress and data.get("train", {}).get("progress", True)
    cfg = validate_config(apply_overrides(data, set_ or []), source=str(path))
    result = api.train(cfg, resume=resume_from or resume)
    resolved = result.path / "config.yaml"
    typer.echo(f"config:  {resolved}  (edit it and run: largo train {resolved})")
    for output, m in result.test.items():
        shown = {k: m[k] for k in ("accuracy", "f1_macro", "mse", "mae", "r2") if m.get(k) is not None}
        typer.echo(f"test {output}: " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    typer.echo(f"bundle:  {result.path}")
    typer.echo(f"report:  {result.report}")


@app.command()
@_friendly
def evaluate(
    bundle: Annotated[str, typer.Argument(help="A bundle folder.")],
    data: Annotated[str, typer.Option("--data", "-d", help="Labelled data to score.")],
    report_dir: Annotated[
        str | None, typer.Option(help="Where to write metrics.json and report.html.")
    ] = None,
) -> None:
    """Score a bundle on labelled data; prints metrics and writes a report."""
    result = api.evaluate(bundle, data, report_dir)
    for output, m in result["test"].items():
        keys = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "mse", "rmse", "mae", "r2")
        typer.echo(f"{output}: " + "  ".join(f"{k}={m[k]:.4f}" for k in keys if m.get(k) is not None))
    typer.echo(f"rows: {result['rows']}  report: {result['report']}")


def _flat(result: dict[str, Any]) -> dict[str, Any]:
    row = {}
    for k, v in result.items():
        if isinstance(v, dict):
            row.update({f"{k.removesuffix('_probabilities')}_prob_{c}": p for c, p in v.items()})
        else:
            row[k] = v
    return row


@app.command()
@_friendly
def predict(
    bundle: Annotated[str, typer.Argument(help="A bundle folder.")],
    data: Annotated[
        str | None, typer.Argument(help="csv / tsv / jsonl / parquet file or image folder.")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write .csv or .jsonl (default: stdout jsonl).")
    ] = None,
    record: Annotated[str | None, typer.Option("--json", help="One record as JSON: '{\"age\": 3}'.")] = None,
    text: Annotated[
        list[str] | None, typer.Option("--text", help="A text to classify (repeatable); one-text models.")
    ] = None,
) -> None:
    """Predict with class probabilities for every row of a file, one JSON record, or --text strings."""
    if text:
        results = api.predict(bundle, list(text))
    elif record is not None:
        results = [api.predict(bundle, json.loads(record))]
    elif data is not None:
        results = api.predict(bundle, Path(data))  # a file: texts come with --text
    else:
        raise ConfigError("give a data file, --json RECORD or --text TEXT")
    if output and output.endswith(".csv"):
        rows = [_flat(r) for r in results]
        with open(output, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        stream = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
        for r in results:
            stream.write(json.dumps(r, ensure_ascii=False) + "\n")
        if output:
            stream.close()
    if output:
        typer.echo(f"{len(results)} predictions → {output}", err=True)


@app.command()
@_friendly
def info(bundle: Annotated[str, typer.Argument(help="A bundle folder.")]) -> None:
    """Show what a bundle holds: features, labels, parameters, test metrics."""
    typer.echo(json.dumps(api.info(bundle), indent=2, ensure_ascii=False))


@app.command("config")
@_friendly
def show_config(
    data: Annotated[str, typer.Argument(help="A data file or image folder.")],
    target: Annotated[list[str], typer.Option("--target", "-t", help="Column to predict.")],
) -> None:
    """Print the config `largo train DATA --target ...` would use, to save and edit."""
    cfg, _ = api.infer_config(data, target)
    typer.echo(dump_config(cfg))


if __name__ == "__main__":
    app()
