"""The Python API: train(), load(), predict(), evaluate(), info(), infer_config(), serve(), export(); from
`api_lm.py`, pretrain() and generate(); from `api_seq2seq.py`, translate() (and train() on a seq2seq
config, load() / predict() / evaluate() / info() on a seq2seq bundle go there).

Each function reads top to bottom through the stages (data → models → train → evaluate → deploy);
the CLI calls these and nothing else.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from largo.api_lm import generate, import_lm, pretrain  # noqa: F401 - the language-model half of this API
from largo.api_seq2seq import evaluate_pairs, predict_pairs, train_seq2seq, translate  # noqa: F401
from largo.api_tune import tune  # noqa: F401 - the search half of this API
from largo.config import Config, ConfigError, load_config, read_yaml_mapping, validate_config
from largo.config_seq2seq import Seq2SeqConfig
from largo.data.features import Processor
from largo.data.infer import Inferred, default_config, infer_features, seq2seq_config
from largo.data.loader import Batch
from largo.data.readers import DataError, read_table, source_dir
from largo.deploy.bundle import (
    environment,
    read_processors,
    run_folder,
    write_bundle,
    write_run_start,
)
from largo.deploy.generator import TextGenerator
from largo.deploy.metadata import bundle_task, is_lm_bundle, is_seq2seq_bundle
from largo.deploy.predictor import Predictor, Records
from largo.deploy.seq2seq_text import Seq2SeqText
from largo.deploy.translator import Translator
from largo.evaluate.report import write_metrics_json, write_report
from largo.evaluate.scoring import headline, score_outputs
from largo.models.build import build_model
from largo.train.checkpoint import seed_everything
from largo.train.distributed import (
    barrier,
    is_main_process,
    log,
    process_group,
)
from largo.train.loop import fit, forward_in_batches
from largo.train.losses import make_loss_fn
from largo.train.prepare import (  # load_splits, encode_split, fit_processors: also part of this API
    augmenter,
    class_weights,
    encode_split,
    fit_processors,
    load_splits,
    read_clean,
)


@dataclass
class TrainResult:
    """A finished run: where its bundle is and what it measured."""

    path: Path
    metrics: dict[str, Any]
    report: Path

    @property
    def test(self) -> dict[str, Any]:
        """Test metrics per output (valid metrics when there is no test split)."""
        return self.metrics.get("test") or self.metrics.get("valid") or {}


def _as_config(config: Config | dict | str | Path) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return validate_config(config)
    return load_config(config)


# ------------------------------------------------------------------------------------------ train


def train(
    config: Config | Seq2SeqConfig | dict | str | Path, *, resume: bool | str | Path = False
) -> TrainResult:
    """Train a model from a config and write its bundle.

    Args:
        config: a Config, the same as a dict, or a YAML file path; a config with `task: seq2seq`
            (a Seq2SeqConfig) trains an encoder-decoder (see `api_seq2seq.train_seq2seq`).
        resume: True to continue the newest unfinished run of this config's name, or a run folder.

    Returns:
        TrainResult with the bundle path, all metrics and the report path.

    Under torchrun (`torchrun --nproc_per_node N -m largo.cli train …`) every process calls this: they
    train data-parallel (see `train/loop.py`); rank 0 picks the run folder, fits the preprocessing (the
    others read it from the folder), validates and writes every file.
    """
    if _task(config) == "seq2seq":
        return train_seq2seq(config, resume=resume)
    cfg = _as_config(config)
    _check_lora(cfg)
    with process_group(cfg.train.device):
        return _train(cfg, resume)


def _task(config: Any) -> str | None:
    """The `task` key of a config given as a model, a dict or a YAML path."""
    if isinstance(config, Seq2SeqConfig):
        return "seq2seq"
    if isinstance(config, str | Path):
        config = read_yaml_mapping(config)
    return config.get("task") if isinstance(config, dict) else None


def _train(cfg: Config, resume: bool | str | Path) -> TrainResult:
    # 1. the run folder: a new version, or the unfinished one being resumed (with its own config)
    run_dir = run_folder(cfg.runs_dir, cfg.name, resume)
    if resume:
        cfg = load_config(run_dir / "config.yaml")
    log(f"run folder: {run_dir}")

    # 2. data: read → clean → split → fit preprocessing on train (rank 0; the others read it) → encode once
    tables, cleaning = load_splits(cfg)
    if not resume and is_main_process():
        processors = fit_processors(tables["train"], cfg)
        write_run_start(run_dir, cfg, processors)
    barrier()
    if resume or not is_main_process():
        processors = read_processors(run_dir, cfg)
    splits = {name: encode_split(t, cfg, processors, name) for name, t in tables.items()}
    sizes = {name: len(s) if s.inputs else 0 for name, s in splits.items()}
    log("split sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))

    # 3. model and objective (seeded first: the same config gives the same initial weights)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, processors)
    if cfg.train.lora is not None:  # adapters on the pretrained encoders' bodies, which stay frozen
        from largo.train.lora import add_lora

        model = add_lora(model, cfg.train.lora)
    loss_fn = make_loss_fn(cfg.outputs, class_weights(cfg, splits["train"], processors))
    valid = splits["valid"] if sizes["valid"] else None

    def score_fn(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        return headline(score_outputs(outputs, valid.targets, cfg.outputs, processors))

    # 4. train
    result = fit(
        model,
        splits["train"],
        valid,
        cfg.train,
        loss_fn,
        score_fn=score_fn,
        transform=augmenter(cfg, processors),
        checkpoint_dir=run_dir / "checkpoints",
        resume=bool(resume),
    )

    # 5. evaluate the final model on valid and test, then write the bundle (rank 0)
    if not is_main_process():
        return TrainResult(run_dir, {"history": result.history}, run_dir / "report.html")
    model.cpu()
    lora_info = None
    if cfg.train.lora is not None:  # fold the adapters in: the bundle is an ordinary one
        from largo.train.lora import lora_summary, merge_lora

        lora_info = lora_summary(model)
        model = merge_lora(model)
    metrics: dict[str, Any] = {
        "name": cfg.name,
        "version": run_dir.name,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "steps": result.steps,
        "train_time_s": result.train_time_s,
        "splits": sizes,
        "cleaning": cleaning,
        "seed": cfg.train.seed,
        "versions": environment(),
        "config": cfg.model_dump(mode="json"),
        **({"lora": lora_info} if lora_info is not None else {}),
    }
    predictions = {}
    for split in ("valid", "test"):
        if sizes[split]:
            outputs = forward_in_batches(
                model, splits[split].inputs, cfg.train.eval_batch_size, pad=splits[split].pad
            )
            metrics[split] = score_outputs(outputs, splits[split].targets, cfg.outputs, processors)
            predictions = _regression_pairs(cfg, outputs, splits[split].targets, processors)
    report = write_bundle(run_dir, model, metrics, predictions)
    if not cfg.train.checkpoint.keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return TrainResult(run_dir, metrics, report)


def _check_lora(cfg: Config) -> None:
    """LoRA needs a pretrained text encoder to adapt, and a classifier bundle holds merged weights."""
    lora = cfg.train.lora
    if lora is None:
        return
    if lora.save != "merged":
        raise ConfigError(
            "train.lora.save: 'adapter' is for language models (largo pretrain); a classifier bundle always "
            "holds merged weights, so use save: merged"
        )
    if not any(f.type == "text" and f.encoder.kind in ("pretrained", "lm") for f in cfg.inputs):
        raise ConfigError(
            "train.lora: needs a text input with a pretrained encoder (`pretrained: <Hugging Face folder>` "
            "or `encoder: {from: <LM bundle>}`); the adapters go on its Linear layers"
        )


def _regression_pairs(cfg: Config, outputs: Batch, targets: Batch, processors: dict[str, Processor]) -> dict:
    pairs = {}
    for f in cfg.outputs:
        if f.type == "number":
            proc = processors[f.name]
            pairs[f.name] = (
                proc.unscale(targets[f.name].double().numpy()),
                proc.unscale(outputs[f.name].double().numpy()),
            )
    return pairs


# ----------------------------------------------------------------------------------- after training


def infer_config(
    data: str | Path, target: str | list[str], name: str | None = None
) -> tuple[Config | Seq2SeqConfig, Inferred]:
    """Read a data file or image folder and build a default config for predicting `target`: a
    Seq2SeqConfig when the target is free text written from one text column (a translation, a
    summary), else a Config of inferred features."""
    path = Path(data)
    targets = [target] if isinstance(target, str) else list(target)
    table = read_table(path)
    pairs = (
        seq2seq_config(str(path), table, targets[0], name or path.stem or "run")
        if len(targets) == 1
        else None
    )
    if pairs is not None:
        from largo.config_seq2seq import validate_seq2seq_config

        return validate_seq2seq_config(pairs), Inferred(rows=table.num_rows)
    inferred = infer_features(table, targets)
    if not inferred.inputs:
        raise ConfigError(f"{path}: no usable input columns besides {targets}; skipped: {inferred.skipped}")
    cfg = validate_config(default_config(str(path), inferred, name or path.stem or "run"))
    return cfg, inferred


def load(path: str | Path, **kwargs: Any) -> Predictor | TextGenerator | Seq2SeqText:
    """Load a bundle: a Predictor (`largo.load(path).predict([{...}])`), for a language model a
    TextGenerator (`largo.load(path).generate("prompt")`), for a seq2seq model a Translator
    (`largo.load(path).translate(["text"])`). `runtime` picks where it runs: a classifier's as
    `load_predictor` takes them; a language model exported to ONNX loads on ONNX Runtime with "onnx"
    (or "onnx-int8"): an `OnnxTextGenerator`, with TextGenerator's methods (a seq2seq model: an
    `OnnxTranslator`, with Translator's); "torch-bf16" keeps the weights of a language or seq2seq model
    in bf16."""
    runtime, task = kwargs.pop("runtime", None), bundle_task(path)
    if runtime == "torch-bf16" and task in ("lm", "seq2seq"):
        runtime, kwargs["precision"] = None, "bf16"
    if task == "lm":
        if runtime in ("onnx", "onnx-int8"):
            from largo.deploy.lm_onnx import OnnxTextGenerator

            return OnnxTextGenerator(path, runtime, **kwargs)
        if runtime not in (None, "torch"):
            raise ValueError(
                f"runtime {runtime!r}: a language model loads on torch, torch-bf16, onnx, onnx-int8"
            )
        return TextGenerator.load(path, **kwargs)
    if task == "seq2seq":
        if runtime in ("onnx", "onnx-int8"):
            from largo.deploy.seq2seq_onnx import OnnxTranslator

            return OnnxTranslator(path, runtime, **kwargs)
        if runtime not in (None, "torch"):
            raise ValueError(
                f"runtime {runtime!r}: a seq2seq model loads on torch, torch-bf16, onnx, onnx-int8"
            )
        return Translator.load(path, **kwargs)
    if runtime is not None:  # a classifier on any of its runtimes (onnx, torch-compile, auto, …)
        from largo.deploy.predictor import load_predictor

        return load_predictor(path, runtime, **kwargs)
    return Predictor.load(path, **kwargs)


def _is_path(data: Any) -> bool:
    """A Path, or a string naming an existing file or folder (a long text is not a file name)."""
    if isinstance(data, Path):
        return True
    try:
        return isinstance(data, str) and Path(data).exists()
    except (OSError, ValueError):  # too long for a file name, or a NUL byte
        return False


def _records(data: Records | str | Path | list[str]) -> tuple[Records, str | None]:
    if _is_path(data):
        table = read_table(data)
        return table, source_dir(table)
    return data, None


def predict(
    bundle: str | Path | Predictor, data: Records | str | Path | list[str]
) -> list[dict[str, Any]] | dict[str, Any]:
    """Predict from a file (csv/tsv/jsonl/parquet/image folder), from records, or from texts.

    A string that is not an existing file is a text to classify (for a model with one text input).
    A seq2seq bundle answers `{"source", "output"}` per source text (see `api_seq2seq.predict_pairs`).
    """
    predictor = bundle if isinstance(bundle, Predictor | Seq2SeqText) else load(bundle)
    if isinstance(predictor, Seq2SeqText):  # a Translator, or an OnnxTranslator
        return predict_pairs(predictor, Path(data) if _is_path(data) else data)
    inputs = predictor.config.inputs
    one_text = len(inputs) == 1 and inputs[0].type == "text"
    if isinstance(data, str) and not one_text and not _is_path(data):
        raise DataError(f"{data}: no such file or folder")
    records, base_dir = _records(data)
    return predictor.predict(records, base_dir=base_dir)


def evaluate(bundle: str | Path | Predictor, data: str | Path, report_dir: str | Path | None = None) -> dict:
    """Score a bundle on a labelled file; writes metrics.json and report.html to report_dir.

    Returns:
        {"test": {output: metrics}, "rows": n, "cleaning": counts, "report": path}. A seq2seq bundle
        is scored on pairs (see `api_seq2seq.evaluate_pairs`).
    """
    predictor = bundle if isinstance(bundle, Predictor | Seq2SeqText) else load(bundle)
    if isinstance(predictor, Seq2SeqText):
        if not isinstance(predictor, Translator):
            raise ValueError(
                "a seq2seq model is scored on torch (its token figures need the model's forward)"
            )
        return evaluate_pairs(predictor, data, report_dir)
    cfg, processors = predictor.config, predictor.bundle.processors
    table, counts = read_clean(str(data), cfg)
    if table.num_rows == 0:
        raise DataError(f"{data}: no labelled rows to evaluate")
    split = encode_split(table, cfg, processors, str(data))
    outputs = predictor.raw_outputs(split.inputs)
    scores = score_outputs(outputs, split.targets, cfg.outputs, processors)
    out_dir = Path(report_dir) if report_dir else predictor.path / "evaluations" / Path(data).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "name": cfg.name,
        "version": predictor.path.name,
        "test": scores,
        "splits": {"test": table.num_rows},
        "cleaning": {"test": counts},
        "data": str(data),
    }
    write_metrics_json(out_dir, metrics)
    report = write_report(
        out_dir, metrics, predictions=_regression_pairs(cfg, outputs, split.targets, processors)
    )
    return {"test": scores, "rows": table.num_rows, "cleaning": counts, "report": str(report)}


def _input_info(feature: Any, proc: Processor) -> dict[str, Any]:
    out = {"name": feature.name, "type": feature.type}
    if feature.type == "text":
        out |= {
            "tokenizer": feature.tokenizer.kind,
            "vocab_size": proc.vocab_size,
            "max_length": proc.max_length,
            "encoder": feature.encoder.kind,
            "train_texts": proc.stats,
        }
    return out


def info(bundle: str | Path) -> dict[str, Any]:
    """What a bundle holds: features, label sets, parameter count, headline metrics, versions."""
    if is_lm_bundle(bundle):
        return TextGenerator.load(bundle).info()
    if is_seq2seq_bundle(bundle):
        return Translator.load(bundle).info()
    predictor = load(bundle)
    b, labels = predictor.bundle, predictor.labels
    test = b.metrics.get("test") or {}
    return {
        "path": str(b.path),
        "name": b.config.name,
        "inputs": [_input_info(f, b.processors[f.name]) for f in b.config.inputs],
        "outputs": [
            {"name": f.name, "type": f.type, **({"labels": labels[f.name]} if f.name in labels else {})}
            for f in b.config.outputs
        ],
        "parameters": sum(p.numel() for p in b.model.parameters()),
        "test": {name: headline({name: m}) for name, m in test.items()},
        "splits": b.metrics.get("splits"),
        "versions": b.metrics.get("versions"),
    }


def serve(
    bundle: str | Path,
    *,
    runtime: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    **options: Any,
) -> None:
    """Serve a bundle over HTTP (FastAPI + uvicorn) until interrupted.

    Args:
        bundle: a bundle folder.
        runtime: 'torch', 'onnx' (ONNX Runtime, no torch needed) or 'auto' (onnx when exported).
        host: interface to bind; the default 127.0.0.1 is reachable from this machine only.
        port: TCP port.
        api_key: when set, /predict, /feedback and /metrics need `Authorization: Bearer <api_key>`.
        max_batch: most records per forward pass (dynamic batching).
        max_wait_ms: longest a request waits for its batch to fill.
        options: `device` (auto: the GPU when there is one, cpu, cuda) and more
            `largo.deploy.server.create_app()` options (queue_size, max_body_bytes, ...).
    """
    from largo.deploy.server import serve_bundle  # lazy: the server's dependencies are an extra

    serve_bundle(
        bundle,
        runtime=runtime,
        host=host,
        port=port,
        api_key=api_key,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        **options,
    )


# ------------------------------------------------------------------------------------------ export


def held_out_rows(bundle: Any, data: str | Path | None) -> tuple[Any, Any]:
    """Encoded (held-out rows, calibration rows or None) for checking and quantizing an export.

    The held-out rows are `data` if given, else the run's test split (its valid split without one).
    Calibration rows (for static int8 of image models) are up to 512 rows of the run's train split.
    """
    from largo.deploy.export import held_out

    cfg = bundle.config
    images = any(f.type == "image" for f in cfg.inputs)
    tables: dict[str, pa.Table] = {}
    try:
        tables = load_splits(cfg)[0] if data is None or images else {}
    except (FileNotFoundError, DataError) as exc:
        if data is None:
            raise DataError(f"cannot re-create the run's test split ({exc}); pass --data FILE") from None
    calibration = None
    if tables and images:
        calibration = held_out(bundle, tables["train"].slice(0, 512), "train split")
    if data is not None:
        table, _ = read_clean(str(data), cfg)
        if table.num_rows == 0:
            raise DataError(f"{data}: no labelled rows to check the export on")
        return held_out(bundle, table, str(data)), calibration
    split = "test" if tables["test"].num_rows else "valid"
    if tables[split].num_rows == 0:
        raise DataError("the run has no test or valid split to check the export on; pass --data FILE")
    return held_out(bundle, tables[split], f"{split} split"), calibration


def export(
    bundle: str | Path,
    format: str = "onnx",
    quantize: str = "none",
    data: str | Path | None = None,
    *,
    exporter: str = "auto",
    max_abs_diff: float = 1e-3,
    benchmark: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Export a bundle (ONNX and/or TorchScript, optionally int8) and check it against eager fp32.

    Args:
        bundle: a bundle folder; the files (model.onnx, model.int8.onnx, model.ts) go into it.
        format: 'onnx', 'torchscript' or 'all' (a language model: 'onnx', its decoding step with the
            KV cache, see deploy/export_lm.py; a seq2seq model: 'onnx', its encoder and decoding step,
            see deploy/export_seq2seq.py).
        quantize: 'none' or 'int8' (ONNX Runtime quantization of the ONNX graphs).
        data: labelled rows for the parity check; default: the run's test split (a language model: a
            text file, default: the run's validation tokens; a seq2seq model: a pairs file).
        exporter: 'auto' (dynamo, falling back to the TorchScript-based exporter), 'dynamo', 'torchscript'.
        max_abs_diff: the largest output difference a faithful (fp32) export may show.
        benchmark: also time every runtime at batch 32 (what `load_predictor(path, 'auto')` reads; a
            language or seq2seq model: greedy decoding at 1 and 8 rows, what `serve --runtime auto`
            reads, and a seq2seq model's beam-search translation).
        compile: include torch.compile in the benchmark (slow to warm up).

    Returns:
        The bundle's export record (export.json). Raises ParityError when a check fails.
    """
    from largo.deploy.bundle import read_bundle
    from largo.deploy.export import export_bundle

    task = bundle_task(bundle)
    if task in ("lm", "seq2seq"):
        return _export_decoder(bundle, task, format, quantize, data, exporter, max_abs_diff, benchmark)
    b = read_bundle(bundle)
    rows, calibration = held_out_rows(b, data)
    return export_bundle(b, rows, format, quantize, calibration, exporter, max_abs_diff, benchmark, compile)


def _export_decoder(
    bundle: str | Path,
    task: str,
    format: str,
    quantize: str,
    data: str | Path | None,
    exporter: str,
    max_abs_diff: float,
    benchmark: bool,
) -> dict[str, Any]:
    """A language model's ONNX export (its decoding step with the KV cache; see deploy/export_lm.py),
    checked on held-out windows of the run's validation tokens, or of the text file `data`; a seq2seq
    model's (its encoder and decoding step; deploy/export_seq2seq.py), on held-out pairs of the run's
    test split, or of the pairs file `data`."""
    what = "a language model" if task == "lm" else "a seq2seq model"
    if format != "onnx":
        raise ValueError(f"format {format!r}: {what} exports to onnx only")
    if exporter not in ("auto", "torchscript"):
        raise ValueError(
            f"exporter {exporter!r}: {what} is exported by the TorchScript-based exporter (auto, torchscript)"
        )
    if task == "seq2seq":
        from largo.deploy.export_seq2seq import export_seq2seq_bundle, held_out_pairs

        translator = Translator.load(bundle)
        pairs, source = held_out_pairs(translator, data)
        return export_seq2seq_bundle(translator, pairs, source, quantize, max_abs_diff, benchmark)
    from largo.deploy.export_lm import export_lm_bundle, held_out_windows
    from largo.deploy.generator import read_lm_bundle

    b = read_lm_bundle(bundle)
    windows, source = held_out_windows(b, data)
    return export_lm_bundle(b, windows, source, quantize, max_abs_diff, benchmark)


def compress(bundle: str | Path, prune: float = 0.5, data: str | Path | None = None) -> tuple[Path, dict]:
    """Magnitude-prune a bundle's weights into the run's next version, checked on held-out rows.

    Returns:
        (the new bundle's path, its compress.json record). Raises ParityError when accuracy drops by
        more than a point (the pruned bundle is still written, with the failed check in its record).
    """
    from largo.deploy.bundle import read_bundle
    from largo.deploy.compress import compress_bundle

    rows, _ = held_out_rows(read_bundle(bundle), data)
    return compress_bundle(bundle, rows, prune)
