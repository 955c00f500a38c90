"""The lifecycle verbs of the command line: `largo registry …`, `largo feedback …`, `largo update`,
`largo monitor` (registered in `cli.py` by `register`). Like the rest of the CLI they import their API
(`largo.lifecycle.api`) on first use."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from largo.cli_common import friendly

# ------------------------------------------------------------------ registry and feedback (lifecycle)

registry_app = typer.Typer(no_args_is_help=True, help="Registered models: versions, aliases, promotion.")
feedback_app = typer.Typer(no_args_is_help=True, help="Corrections and new labelled rows for a model.")

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="Store URL or SQLite file (default: $LARGO_DB_URL, else runs/largo.db)."),
]


def _lifecycle() -> Any:
    from largo.lifecycle import api as module  # torch-free, but SQLAlchemy loads only when needed

    return module


@registry_app.command("list")
@friendly
def registry_list(db: DbOption = None) -> None:
    """Every registered model with its version count, latest version and aliases."""
    rows = _lifecycle().registry_list(db)
    if not rows:
        typer.echo("no registered models (largo registry add NAME BUNDLE)")
    for r in rows:
        aliases = "  ".join(f"{a}={v}" for a, v in r["aliases"].items())
        typer.echo(f"{r['name']:<24} versions={r['versions']:<4} latest={r['latest']:<4} {aliases}")


@registry_app.command("show")
@friendly
def registry_show(
    name: Annotated[str, typer.Argument(help="A registered model name.")], db: DbOption = None
) -> None:
    """A model's versions (bundle, hash, metrics, lineage, aliases) and alias history, as JSON."""
    typer.echo(json.dumps(_lifecycle().registry_show(name, db), indent=2, ensure_ascii=False))


@registry_app.command("add")
@friendly
def registry_add(
    name: Annotated[str, typer.Argument(help="Model name (created on first use).")],
    bundle: Annotated[str, typer.Argument(help="A finished bundle folder.")],
    parent: Annotated[int | None, typer.Option(help="The version this bundle was trained from.")] = None,
    db: DbOption = None,
) -> None:
    """Register a bundle as the next version of NAME (its files are hashed: it must not change after)."""
    v = _lifecycle().registry_add(name, bundle, db, parent=parent)
    typer.echo(f"registered {v.ref}: {v.path}  (sha256 {v.files_hash[:12]})")


@registry_app.command("promote")
@friendly
def registry_promote(
    name: Annotated[str, typer.Argument(help="A registered model name.")],
    version: Annotated[int, typer.Argument(help="The version to serve as production.")],
    db: DbOption = None,
) -> None:
    """Point NAME's production alias at VERSION (rollback returns to the previous one)."""
    v = _lifecycle().promote(name, version, db)
    typer.echo(f"{name}@production → {v.version}  ({v.path})")


@registry_app.command("rollback")
@friendly
def registry_rollback(
    name: Annotated[str, typer.Argument(help="A registered model name.")],
    alias: Annotated[str, typer.Option(help="The alias to roll back.")] = "production",
    db: DbOption = None,
) -> None:
    """Return NAME's production alias (or --alias) to the version it had before its latest change."""
    v = _lifecycle().rollback(name, db, alias)
    typer.echo(f"{name}@{alias} → {v.version}  ({v.path})")


@registry_app.command("alias")
@friendly
def registry_alias(
    name: Annotated[str, typer.Argument(help="A registered model name.")],
    alias: Annotated[str, typer.Argument(help="Any alias name, e.g. candidate.")],
    version: Annotated[int, typer.Argument(help="The version it points at.")],
    db: DbOption = None,
) -> None:
    """Point an alias of NAME at VERSION."""
    v = _lifecycle().set_alias(name, alias, version, db)
    typer.echo(f"{name}@{alias} → {v.version}  ({v.path})")


@feedback_app.command("import")
@friendly
def feedback_import(
    name: Annotated[str, typer.Argument(help="A registered model: NAME, NAME@VERSION or NAME@ALIAS.")],
    data: Annotated[
        str, typer.Argument(help="csv/tsv/jsonl/parquet: prediction_id,label or inputs + label.")
    ],
    db: DbOption = None,
) -> None:
    """Store corrections of predictions (prediction_id,label) and new labelled rows (inputs, label)."""
    r = _lifecycle().feedback_import(name, data, db)
    typer.echo(f"imported {r.corrections} corrections and {r.new_rows} new labelled rows for {name}")


@feedback_app.command("export")
@friendly
def feedback_export(
    name: Annotated[str, typer.Argument(help="A registered language (or seq2seq) model.")],
    out: Annotated[
        str, typer.Argument(help='The JSONL file to write ({"text": ...} lines; seq2seq: pairs).')
    ],
    db: DbOption = None,
) -> None:
    """Write a language model's feedback as a corpus to fine-tune on: corrections and texts rated good
    (a seq2seq model's: as pairs of its source and target columns)."""
    r = _lifecycle().feedback_export(name, out, db)
    written = r.corrections + r.rated_good
    typer.echo(
        f"wrote {written} texts to {r.path} ({r.corrections} corrections, "
        f"{r.rated_good} rated good; {r.rated_bad} only rated bad, left out)"
    )
    if written and r.task == "seq2seq":
        typer.echo(f"train on them: largo update {name} (the original pairs plus these, gated on chrF)")
    elif written:
        typer.echo(
            f"fine-tune on them: largo pretrain {r.path} --config lm.yaml with train.init_from: the bundle"
        )


@friendly
def update(
    name: Annotated[
        str, typer.Argument(help="A registered model: NAME (its production version) or NAME@VERSION.")
    ],
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="update.yaml: update: {mode, epochs, lr, gate, ...}.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set update.mode=retrain")
    ] = None,
    db: DbOption = None,
) -> None:
    """Fine-tune or retrain on the original data plus feedback; promote only if the gate passes.

    Prints old vs new on the frozen test split and the held-out feedback. A language model is
    fine-tuned on its corrections and good-rated generations (update.steps) and judged on the held-out
    feedback's completion loss and its corpus's held-out loss. Exits 0 whether or not the new version
    was promoted.
    """
    result = _lifecycle().update(name, config, set_ or [], db)
    typer.echo(result.table())
    typer.echo(f"bundle:  {result.path}")


@friendly
def monitor(
    name: Annotated[str, typer.Argument(help="A registered model: NAME, NAME@VERSION or NAME@ALIAS.")],
    since: Annotated[
        str | None, typer.Option(help="Only rows since: 7d, 24h, 30m, 2026-11-20 or an ISO time.")
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="HTML report (default: runs/<name>/monitor.html).")
    ] = None,
    db: DbOption = None,
) -> None:
    """Input drift against the training data, predictions, confidence, feedback accuracy and latency."""
    report = _lifecycle().monitor(name, since, out, db)
    typer.echo(report.table())
    typer.echo(f"report:  {report.html}")


def register(app: typer.Typer) -> None:
    """Add the lifecycle verbs to the `largo` command."""
    app.add_typer(registry_app, name="registry")
    app.add_typer(feedback_app, name="feedback")
    app.command()(update)
    app.command()(monitor)
