"""The command line: `largo train|evaluate|predict|info|export|compress|…`. Each verb calls the API
function of its name; the API is imported on first use, so importing this module needs no torch."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from largo.cli_common import api, friendly
from largo.cli_lifecycle import register as register_lifecycle
from largo.config import (
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    read_yaml_mapping,
    validate_config,
)
from largo.config_seq2seq import dump_seq2seq_config, load_seq2seq_config, validate_seq2seq_config
from largo.deploy.metadata import BundleError, ParityError, bundle_task, hf_hint

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="largo: data → model → bundle → predictions."
)


def _main_process() -> bool:
    from largo.train.distributed import is_main_process  # torch: only once training has run

    return is_main_process()


def _print_scores(split: str, outputs: dict[str, Any]) -> None:
    """One line of headline metrics per output: `test label: accuracy=…  f1_macro=…`."""
    for output, m in outputs.items():
        keys = ("accuracy", "f1_macro", "mse", "mae", "r2", "bleu", "chrf", "exact_match", "perplexity")
        shown = {k: m[k] for k in keys if m.get(k) is not None}
        typer.echo(f"{split} {output}: " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))


@app.command()
@friendly
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
    seq2seq = path.suffix in (".yaml", ".yml") and read_yaml_mapping(path).get("task") == "seq2seq"
    if seq2seq:  # text pairs → an encoder-decoder
        data = load_seq2seq_config(path).model_dump(mode="json")
    elif path.suffix in (".yaml", ".yml"):
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
        seq2seq = getattr(cfg, "task", None) == "seq2seq"
        if seq2seq:
            typer.echo(
                f"note: {target[0]!r} is free text: a seq2seq model writes it from {cfg.data.source!r}",
                err=True,
            )
        data = cfg.model_dump(mode="json")
    if name:
        data["name"] = name
    if epochs:
        data.setdefault("train", {})["epochs"] = epochs
    if runs_dir:
        data["runs_dir"] = runs_dir
    data.setdefault("train", {})["progress"] = progress and data.get("train", {}).get("progress", True)
    data = apply_overrides(data, set_ or [])
    validate = validate_seq2seq_config if seq2seq else validate_config
    result = api.train(validate(data, source=str(path)), resume=resume_from or resume)
    if not _main_process():  # under torchrun, rank 0 reports
        return
    resolved = result.path / "config.yaml"
    typer.echo(f"config:  {resolved}  (edit it and run: largo train {resolved})")
    _print_scores("test", result.test)
    typer.echo(f"bundle:  {result.path}")
    typer.echo(f"report:  {result.report}")


@app.command()
@friendly
def tune(
    config: Annotated[
        str, typer.Argument(help="A config.yaml with a tune: section (space, metric, trials).")
    ],
    trials: Annotated[
        int | None, typer.Option(min=1, help="Override tune.trials (the study's total).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override any key: --set tune.sampler=random")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the newest search of this name (runs/<name>/tune-N).")
    ] = False,
    retrain: Annotated[
        bool, typer.Option("--retrain/--no-retrain", help="Train the best config into a bundle at the end.")
    ] = True,
) -> None:
    """Search hyperparameters (optuna: TPE, median pruning), then train the best config into a bundle.

    Prints every trial, best first; writes tune.json, best.yaml and history.png beside the study.
    """
    from largo.api_tune import is_lm_config  # a model's config, or a language model's
    from largo.config_lm import read_lm_yaml, validate_lm_config

    raw = read_lm_yaml(config)  # as written: --set model.preset then sets the preset's sizes
    seq2seq = raw.get("task") == "seq2seq"
    if seq2seq:
        raw = load_seq2seq_config(config).model_dump(mode="json")
    data = apply_overrides(
        raw if is_lm_config(raw) or seq2seq else load_config(config).model_dump(mode="json"), set_ or []
    )
    if trials is not None:
        if not data.get("tune"):
            raise ConfigError(f"{config}: no tune section to set tune.trials in (tune: {{space: ...}})")
        data["tune"]["trials"] = trials
    try:
        validate = validate_lm_config if is_lm_config(data) else validate_config
        validate = validate_seq2seq_config if seq2seq else validate
        result = api.tune(validate(data, source=config), resume=resume, retrain=retrain)
    except ImportError as exc:  # optuna missing: say how to install it
        raise ConfigError(str(exc)) from None
    typer.echo(result.table())
    typer.echo(f"search:  {result.study.folder}  (best.yaml, tune.json, history.png)")
    if result.path is not None:
        lm = (result.metrics.get("valid") or {}).get("lm")
        if lm:
            typer.echo(
                f"valid: loss={lm['loss']:.4f}  perplexity={lm['perplexity']:.2f}  bpc={lm['bpc']:.4f}"
            )
        else:
            split = "test" if result.metrics.get("test") else "valid"
            _print_scores(split, result.metrics.get(split) or {})
        typer.echo(f"bundle:  {result.path}")


@app.command()
@friendly
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
        keys += ("bleu", "chrf", "exact_match", "perplexity", "token_accuracy")  # a seq2seq bundle
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
@friendly
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
@friendly
def info(bundle: Annotated[str, typer.Argument(help="A bundle folder.")]) -> None:
    """Show what a bundle holds: features, labels, parameters, test metrics."""
    typer.echo(json.dumps(api.info(bundle), indent=2, ensure_ascii=False))


@app.command()
@friendly
def serve(
    bundle: Annotated[
        str, typer.Argument(help="A bundle folder, or a registered model: NAME, NAME@VERSION or NAME@ALIAS.")
    ],
    runtime: Annotated[
        str,
        typer.Option(help="torch | onnx | auto (also torch-bf16, torch-compile, onnx-int8)."),
    ] = "auto",
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it to the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    device: Annotated[
        str,
        typer.Option(help="Where a torch runtime runs the model: auto (the GPU if any), cpu, cuda, cuda:N."),
    ] = "auto",
    api_key_env: Annotated[
        str | None,
        typer.Option("--api-key-env", help="Environment variable holding the API key clients must send."),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            help="Most records per forward pass (an LM or seq2seq: generations decoded together).",
        ),
    ] = 32,
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", help="Longest wait for a batch to fill, in ms.")
    ] = 5.0,
    prefill_chunk: Annotated[
        int,
        typer.Option(
            "--prefill-chunk",
            min=0,
            help="An LM: read at most this many prompt tokens between two decoding steps, so running "
            "streams wait one chunk for a long prompt, not all of it (0: whole prompts).",
        ),
    ] = 256,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="Registered model: store URL or SQLite file (default: $LARGO_DB_URL, else runs/largo.db).",
        ),
    ] = None,
    poll_s: Annotated[
        float,
        typer.Option(
            "--poll-s", help="Registered model: seconds between looks at its alias (0: never swaps)."
        ),
    ] = 1.0,
) -> None:
    """Serve a bundle over HTTP: POST /predict, POST /feedback, GET /metrics, and a page at /.

    A language-model bundle gets POST /generate instead (JSON, or server-sent events as it generates).

    Given a registered NAME (or NAME@ALIAS) instead of a folder, it serves that version, logs
    predictions and feedback to the store, and swaps in the new version when the alias is promoted
    or rolled back, without a restart.
    """
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
    options: dict[str, Any] = {
        "runtime": runtime,
        "device": device,
        "host": host,
        "port": port,
        "api_key": api_key,
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "prefill_chunk": prefill_chunk,
    }
    # what api.serve() calls, called directly: largo.api imports torch, and an ONNX-only serving image
    # has none (the one verb that cannot go through the API module). A path is a bundle; else a name.
    if Path(bundle).is_dir() or "/" in bundle or os.sep in bundle:
        from largo.deploy.server import serve_bundle

        serve_bundle(bundle, **options)
    else:
        from largo.lifecycle.serving import serve_registered

        serve_registered(bundle, db=db, poll_s=poll_s, **options)


def _print_checks(sections: dict[str, Any]) -> None:
    """One line per checked file: verdict, largest output difference, label agreement, accuracy (a
    language model: largest logit difference, argmax agreement through the cache, perplexity)."""
    for name, section in sections.items():
        check = section["parity"]
        if "perplexity" in check:
            ppl, paths = check["perplexity"], [check[p] for p in ("whole", "cached", "rows") if p in check]
            diff = max(p["max_abs_diff"] for p in paths)
            agree = min(p["argmax_agreement"] for p in paths)
            typer.echo(
                f"{name:<12} {'ok' if check['passed'] else 'FAILED':<7} logits: max_abs_diff={diff:.2e}  "
                f"agreement={agree:.4f}  perplexity {ppl['before']:.3f} → {ppl['after']:.3f} "
                f"(worst {ppl['increase']:+.2%})  ({check['tokens']} tokens)"
            )
            if "outputs" in check:  # a seq2seq model: its beam-searched outputs beside eager's
                out = check["outputs"]
                typer.echo(
                    f"{'':<20} outputs ({out['beams']} beams): {out['same']:.1%} the same  "
                    f"chrF {out['before']['chrf']:.2f} → {out['after']['chrf']:.2f}  "
                    f"BLEU {out['before']['bleu']:.2f} → {out['after']['bleu']:.2f}  ({check['pairs']} pairs)"
                )
            continue
        for output, m in check["outputs"].items():
            agree = f"  agreement={m['label_agreement']:.4f}" if "label_agreement" in m else ""
            verdict = "ok" if m["passed"] else "FAILED"
            typer.echo(
                f"{name:<12} {verdict:<7} {output}: max_abs_diff={m['max_abs_diff']:.2e}{agree}  "
                f"{m['metric']} {m['before']:.4f} → {m['after']:.4f}  ({check['rows']} rows)"
            )


@app.command()
@friendly
def export(
    bundle: Annotated[str, typer.Argument(help="A bundle folder; the exported files go into it.")],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx | torchscript | all.")] = "onnx",
    quantize: Annotated[
        str, typer.Option(help="none | int8 (ONNX Runtime int8 of the ONNX graphs).")
    ] = "none",
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Labelled rows for the parity check (default: test split; a language model: a text file, "
            "default: its validation tokens; a seq2seq model: a pairs file).",
        ),
    ] = None,
    exporter: Annotated[
        str, typer.Option(help="auto (dynamo, else TorchScript-based) | dynamo | torchscript.")
    ] = "auto",
    max_diff: Annotated[
        float, typer.Option("--max-diff", help="Largest output difference an fp32 export may show.")
    ] = 1e-3,
    benchmark: Annotated[
        bool,
        typer.Option(
            "--benchmark",
            help="Time every runtime at batch 32 (a language model: decoding at 1 and 8 rows); "
            "what --runtime auto reads.",
        ),
    ] = False,
) -> None:
    """Export to ONNX / TorchScript (optionally int8) and check it against the eager model.

    A language model exports to ONNX with its KV cache, a seq2seq model as its encoder and decoding step
    (serve either with --runtime onnx, without torch).

    Exits 1 when a parity check fails; the checks are in the bundle's export.json either way.
    """
    try:
        record = api.export(bundle, format, quantize, data, exporter=exporter, max_abs_diff=max_diff,
                            benchmark=benchmark)  # fmt: skip
    except ParityError as exc:
        from largo.deploy.metadata import EXPORT_RECORD, read_json

        _print_checks(read_json(Path(bundle) / EXPORT_RECORD).get("formats", {}))
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    _print_checks(record["formats"])
    if benchmark:
        bench = record["benchmark"]
        for name, m in bench["runtimes"].items():
            if "tokens_per_s" in m:  # a language model: greedy decoding at 1 and 8 rows
                speeds = "  ".join(f"{rows} rows {v:,.0f} tok/s" for rows, v in m["tokens_per_s"].items())
                beams = f"  beam search {m['sources_per_s']:,.1f} sources/s" if "sources_per_s" in m else ""
                typer.echo(f"{name:<14} {speeds}  {m['ratio']:.2f}x{beams}")
                continue
            typer.echo(
                f"{name:<14} {m['rows_per_s']:>10,.0f} rows/s  {m['ratio']:.2f}x  acc {m['accuracy']:.4f}"
            )
        typer.echo(f"runtime auto → {bench['choice']}")


@app.command()
@friendly
def compress(
    bundle: Annotated[str, typer.Argument(help="A bundle folder.")],
    prune: Annotated[float, typer.Option(help="Fraction of each weight matrix to zero (0..1).")] = 0.5,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="Labelled rows for the accuracy check (default: test split)."),
    ] = None,
) -> None:
    """Magnitude-prune the weights into the run's next version; exits 1 if accuracy drops > 1 point."""
    try:
        path, record = api.compress(bundle, prune, data)
    except ParityError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    _print_checks({"pruned": record})
    typer.echo(f"zero weights: {record['zero_fraction']:.1%}  bundle: {path}")


@app.command()
@friendly
def pretrain(
    corpus: Annotated[
        list[str] | None,
        typer.Argument(help="Corpus files (.txt, .jsonl, .parquet) or folders; override data.paths."),
    ] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="An LM config YAML.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (runs/<name>/<version>).")] = None,
    steps: Annotated[int | None, typer.Option(help="Override train.steps.")] = None,
    runs_dir: Annotated[str | None, typer.Option("--runs-dir", help="Override runs_dir.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override any key: --set model.preset=gpt-14m")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the newest unfinished run of this name.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Pretrain a GPT-style language model on raw text; prints held-out perplexity and the bundle."""
    from largo.config_lm import read_lm_yaml, validate_lm_config

    data: dict[str, Any] = read_lm_yaml(config) if config else {}
    if corpus:
        data.setdefault("data", {})["paths"] = list(corpus)
    if not (data.get("data") or {}).get("paths"):
        raise ConfigError("give corpus files or folders, or a --config whose data.paths names them")
    for key, value in (("name", name), ("runs_dir", runs_dir)):
        if value:
            data[key] = value
    if steps:
        data.setdefault("train", {})["steps"] = steps
    if not progress:
        data.setdefault("train", {})["progress"] = False
    cfg = validate_lm_config(apply_overrides(data, set_ or []), source=config or "command line")
    result = api.pretrain(cfg, resume=resume)
    if not _main_process():  # under torchrun, rank 0 reports
        return
    lm = (result.metrics.get("valid") or {}).get("lm")
    if lm:
        typer.echo(f"valid: loss={lm['loss']:.4f}  perplexity={lm['perplexity']:.2f}  bpc={lm['bpc']:.4f}")
    typer.echo(f"tokens/s: {result.metrics['tokens_per_s']:,.0f}  ({result.metrics['tokens']:,} tokens)")
    typer.echo(f"bundle:  {result.path}")
    typer.echo(f"report:  {result.report}")


@app.command()
@friendly
def generate(
    bundle: Annotated[str, typer.Argument(help="A language-model (or seq2seq) bundle folder.")],
    prompt: Annotated[str, typer.Argument(help="The text to continue (a seq2seq model: to translate).")] = "",
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", "-n", help="Most new tokens (default: 100; seq2seq: the bundle's)."),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature; 0 is greedy (default: 0.8; seq2seq: 0).")
    ] = None,
    beams: Annotated[
        int | None,
        typer.Option(min=1, help="A seq2seq bundle: beam width (default: the bundle's); 1 streams."),
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Sample among the k likeliest tokens.")] = 50,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="Sample within this probability mass (nucleus).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed: the same seed gives the same text.")] = 0,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they come.")] = True,
    precision: Annotated[
        str, typer.Option(help="fp32, or bf16: weights and KV cache in bf16 (faster, same greedy text here).")
    ] = "fp32",
    runtime: Annotated[
        str, typer.Option(help="torch, or onnx / onnx-int8: a bundle exported with `largo export`.")
    ] = "torch",
    chat: Annotated[
        bool,
        typer.Option("--chat", help="The prompt is a user's message, laid out by the model's chat template."),
    ] = False,
    system: Annotated[
        str | None, typer.Option(help="With --chat: a system message before the user's.")
    ] = None,
) -> None:
    """Continue a prompt with a language-model bundle (KV-cached sampling); with a seq2seq bundle, write
    the prompt's target (beam search; greedy or sampled tokens, streamed, with --beams 1 or --temperature)."""
    task = bundle_task(bundle)
    if task not in ("lm", "seq2seq"):
        hint = hf_hint(bundle) or " (largo predict uses it)"
        raise BundleError(f"{bundle}: not a language-model or seq2seq bundle{hint}")
    if runtime != "torch":
        if runtime not in ("onnx", "onnx-int8"):
            raise ConfigError(f"--runtime {runtime}: allowed: torch, onnx, onnx-int8")
        if precision != "fp32":
            raise ConfigError(
                f"--precision {precision}: a torch setting; the ONNX graph's precision is fixed"
            )
        if task == "lm":  # not through largo.api: no torch needed
            from largo.deploy.lm_onnx import OnnxTextGenerator

            gen = OnnxTextGenerator(bundle, runtime)
        else:
            from largo.deploy.seq2seq_onnx import OnnxTranslator

            gen = OnnxTranslator(bundle, runtime)
    else:
        gen = api.load(bundle, precision=precision)
    if chat or system is not None:  # the prompt is a user's message (after a system message)
        messages = [{"role": "system", "content": system}] if system is not None else []
        try:
            prompt = gen.chat_prompt([*messages, {"role": "user", "content": prompt}])
        except ValueError as e:
            raise ConfigError(f"--chat: {e}") from None
    if task == "seq2seq" and beams != 1:
        if temperature is not None and beams is not None:
            raise ConfigError("--beams N searches deterministically; to sample (--temperature) use --beams 1")
        if temperature is None:  # the whole output at once: beam search
            typer.echo(gen.translate(prompt, beams=beams, max_new_tokens=max_new_tokens)[0])
            return
    if max_new_tokens is None:
        max_new_tokens = gen.config.max_new_tokens if task == "seq2seq" else 100
    temperature = gen.default_temperature if temperature is None else temperature
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    if stream:
        for piece in gen.stream(prompt, max_new_tokens, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        typer.echo(gen.generate(prompt, max_new_tokens, **sampling))


@app.command("import")
@friendly
def import_(
    folder: Annotated[
        str, typer.Argument(help="A Hugging Face causal LM folder (Llama, Mistral, Qwen2; safetensors).")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="The LM bundle folder to write.")],
    context: Annotated[
        int | None,
        typer.Option(min=8, help="Longest sequence attended over (default: the model's, at most 2048)."),
    ] = None,
) -> None:
    """Convert a local Hugging Face causal LM into an LM bundle: generate, serve, export, fine-tune (LoRA
    too) and update it like one `largo pretrain` wrote. Nothing is downloaded."""
    import json

    path = api.import_lm(folder, out, context=context)
    imported = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    record = imported["imported"]
    typer.echo(
        f"imported {record['model_type']} ({imported['parameters']:,} parameters), "
        f"context {record['context']} of {record['max_position_embeddings']}, end of text {record['eot']!r}"
        + (f", begins with {record['bos']!r}" if record["bos"] else "")
        + (f", also stops at {', '.join(map(repr, record['stop']))}" if record["stop"] else "")
    )
    typer.echo(f"bundle:  {path}")
    typer.echo(f'try:     largo generate {path} "..."')


@app.command("config")
@friendly
def show_config(
    data: Annotated[str, typer.Argument(help="A data file or image folder.")],
    target: Annotated[list[str], typer.Option("--target", "-t", help="Column to predict.")],
) -> None:
    """Print the config `largo train DATA --target ...` would use, to save and edit."""
    cfg, _ = api.infer_config(data, target)
    typer.echo(dump_seq2seq_config(cfg) if getattr(cfg, "task", None) == "seq2seq" else dump_config(cfg))


register_lifecycle(app)

if __name__ == "__main__":
    app()
